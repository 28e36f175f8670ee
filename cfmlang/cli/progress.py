"""Progress on stderr: bars over output bytes and training steps on a terminal, lines
when stderr is not one, with a heartbeat line during long phases that print nothing."""
from __future__ import annotations

import os
import sys
import threading
import time

HEARTBEAT_SECONDS = 10.0
HEARTBEAT_VARIABLE = "CFM_HEARTBEAT_SECONDS"
"""Overrides the heartbeat interval (seconds, a positive number; a log that wants fewer
lines sets it higher, a test lower)."""


def heartbeat_interval() -> float:
    """`CFM_HEARTBEAT_SECONDS` when it is a positive finite number, else 10 s."""
    try:
        value = float(os.environ.get(HEARTBEAT_VARIABLE, HEARTBEAT_SECONDS))
    except ValueError:
        return HEARTBEAT_SECONDS
    return value if 0 < value < float("inf") else HEARTBEAT_SECONDS


class ProgressBar:
    """A rich progress bar over output bytes, drawn on stderr when it is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.progress = self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
            )

            self.progress = Progress("[bold]writing", BarColumn(), DownloadColumn(),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("write", total=None)
        return self

    def update(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False


class TrainingBar:
    """A bar per training brick with its loss on a terminal; otherwise a log line every
    tenth of the steps."""

    def __init__(self, enabled: bool, log):
        self.live = enabled and sys.stderr.isatty()
        self.log = log
        self.progress = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]training {task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                                     TimeRemainingColumn(), console=Console(stderr=True))
            self.progress.__enter__()
        return self

    def step(self, name: str, step: int, steps: int, loss: float) -> None:
        if self.progress is None:
            if step == steps or step % max(1, steps // 10) == 0:
                self.log(f"training {name}: step {step}/{steps}, loss {loss:.4f}")
            return
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=steps, loss=loss)
        self.progress.update(self.tasks[name], completed=step, loss=loss)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False


def short_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {short_value(v)}" for k, v in value.items())
    return str(value)


class StageLog:
    """Progress of the analysis stages on stderr: a live counter on a terminal, else a
    line per stage and per quarter of it (through `say`, a heartbeat's `log`)."""

    def __init__(self, stream, enabled: bool, say=None):
        self.stream, self.enabled = stream, enabled
        self.live = enabled and stream.isatty()
        self.open = False
        self.say = say or (lambda message: print(message, file=stream, flush=True))

    def stage(self, title: str, steps: int):
        import time

        self.close()
        state = {"done": 0, "start": time.monotonic()}
        self.open = self.enabled
        if self.enabled and not self.live:
            self.say(f"{title}: {steps} steps")

        def tick():
            state["done"] += 1
            done, elapsed = state["done"], time.monotonic() - state["start"]
            if self.live:
                end = "\n" if done >= steps else ""
                print(f"\r{title}: {done}/{steps} ({elapsed:.0f} s)", end=end, file=self.stream, flush=True)
            elif self.enabled and done * 4 // max(steps, 1) != (done - 1) * 4 // max(steps, 1):
                self.say(f"  {title}: {done}/{steps} ({elapsed:.0f} s)")
            self.open = done < steps and self.live
        return tick

    def close(self):
        if self.open:
            print(file=self.stream, flush=True)
        self.open = False


class Heartbeat:
    """When stderr is not a terminal (a log, a CI job), a line at least every `interval`
    seconds while a command works: `still working (N s): <the last thing it said>`.
    `log` prints a line and restarts the interval; `note` changes what the next
    heartbeat line says without printing."""

    def __init__(self, enabled: bool, stream=None, interval: float | None = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and not self.stream.isatty()
        self.interval = heartbeat_interval() if interval is None else interval
        self.start = self.last = time.monotonic()
        self.doing = "starting"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def log(self, message: str, doing: str | None = None) -> None:
        """Print `message`; later heartbeat lines repeat `doing`, by default its first line."""
        print(message, file=self.stream, flush=True)
        self.last = time.monotonic()
        self.doing = doing or (message.splitlines()[0] if message else self.doing)

    def note(self, doing: str) -> None:
        self.doing = doing

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._beat, name="cfmc-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.interval)):
            now = time.monotonic()
            if now - self.last >= self.interval:
                print(f"still working ({now - self.start:.0f} s): {self.doing}", file=self.stream, flush=True)
                self.last = now

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False
