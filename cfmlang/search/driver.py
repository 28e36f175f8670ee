"""The loop of a search: ask the study for a trial, write its program, run it (here, or
as a Ray task through parallel.py), store its result, print its progress line."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from cfmlang.search.program import SearchProgram
from cfmlang.search.text import program_text
from cfmlang.search.trial import TrialJob, TrialOutcome, run_trial


class Interrupted(Exception):
    """A search stopped by a signal; finished trials are stored."""

    def __init__(self, finished: int, budget: int, cause: BaseException):
        super().__init__(f"{finished} of {budget} trials finished")
        self.finished, self.budget, self.cause = finished, budget, cause


def finished_trials(study) -> list:
    """Trials that count against the budget: completed, or failed by their program."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return [t for t in study.trials if t.state in done and not t.user_attrs.get("interrupted")]


def suggest(trial, opened: SearchProgram) -> dict:
    """The trial's concrete values, by dimension name."""
    values = {}
    for d in opened.dimensions:
        if d.kind == "choice":
            values[d.name] = trial.suggest_categorical(d.name, list(d.texts))
        elif d.kind == "int":
            values[d.name] = trial.suggest_int(d.name, d.low, d.high, log=d.log)
        else:
            values[d.name] = d.concrete(trial.suggest_float(d.name, d.low, d.high, log=d.log))
    return values


@dataclass
class Driver:
    """Asks the study for trials, runs them (here or on Ray), and stores each result."""

    study: object
    opened: SearchProgram
    source: str
    path: Path
    output: Path
    settings: object     # study.SearchSettings

    @property
    def budget(self) -> int:
        return self.opened.search.budget

    def job(self, trial, values: dict) -> TrialJob:
        header = [f"trial {trial.number} of `cfmc search` over {self.path.name} (search `{self.opened.search.name}`)"]
        text = program_text(self.source, self.opened, values, header)
        file = self.output / "trials" / f"{trial.number:04d}.brick"
        write_atomically(file, text)
        trial.set_user_attr("values", values)
        return TrialJob(trial.number, text, str(file), str(self.path.resolve().parent), self.opened.search.objective,
                        str(self.settings.cache_dir) if self.settings.cache_dir else None)

    def repeat(self, values: dict):
        import optuna

        return next((t for t in self.study.trials if t.state == optuna.trial.TrialState.COMPLETE
                     and t.user_attrs.get("values") == values), None)

    def next_job(self) -> tuple[object, TrialJob | None]:
        """A new trial and its job; None for a trial that repeats a finished one (told here)."""
        trial = self.study.ask()
        values = suggest(trial, self.opened)
        earlier = self.repeat(values)
        if earlier is None:
            return trial, self.job(trial, values)
        trial.set_user_attr("values", values)
        trial.set_user_attr("repeat_of", earlier.number)
        trial.set_user_attr("metrics", earlier.user_attrs.get("metrics", {}))
        self.study.tell(trial, earlier.value)
        self.progress(trial.number, earlier.value, values, f"same values as trial {earlier.number}")
        return trial, None

    def tell(self, trial, outcome: TrialOutcome) -> None:
        import optuna

        trial.set_user_attr("compile_seconds", round(outcome.compile_seconds, 3))
        trial.set_user_attr("eval_seconds", round(outcome.eval_seconds, 3))
        if outcome.node:
            trial.set_user_attr("node", outcome.node)
        if outcome.value is None:
            trial.set_user_attr("error", outcome.error)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.progress(trial.number, None, trial.user_attrs["values"], f"failed: {outcome.error}")
            return
        trial.set_user_attr("metrics", outcome.metrics)
        self.study.tell(trial, outcome.value)
        where = f" on node {outcome.node[:8]}" if outcome.node else ""
        self.progress(trial.number, outcome.value, trial.user_attrs["values"],
                      f"compile {outcome.compile_seconds:.1f}s, eval {outcome.eval_seconds:.1f}s{where}")

    def interrupt(self, trial) -> None:
        """A trial cut off while running: marked, and queued to run again with its values."""
        import optuna

        with contextlib.suppress(Exception):
            if self.study._storage.get_trial(trial._trial_id).state != optuna.trial.TrialState.RUNNING:
                return      # its result was stored before the stop
            trial.set_user_attr("interrupted", True)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.study.enqueue_trial(trial.params)

    def progress(self, number: int, value, values: dict, note: str) -> None:
        done = len(finished_trials(self.study))
        try:
            best = self.study.best_trial
            best_text = f"best {best.value:.6g} (trial {best.number})"
        except ValueError:
            best_text = "no best yet"
        shown = "failed" if value is None else f"{value:.6g}"
        chosen = ", ".join(f"{name}={value_text(v)}" for name, v in values.items())
        self.settings.progress(f"trial {number} [{done}/{self.budget}]: {shown}; {best_text}; {chosen} ({note})")

    def remaining(self) -> int:
        return max(0, self.budget - len(finished_trials(self.study)))

    def run_local(self) -> None:
        trial = None
        try:
            while self.remaining():
                trial, job = self.next_job()
                if job is not None:
                    self.tell(trial, run_trial(job))
                trial = None
        except BaseException as exc:
            if trial is not None:
                self.interrupt(trial)
            if isinstance(exc, Exception) and not is_stop(exc):
                raise
            raise Interrupted(len(finished_trials(self.study)), self.budget, exc) from None


def is_stop(exc: BaseException) -> bool:
    from cfmlang.artifact.write import Terminated

    return isinstance(exc, (KeyboardInterrupt, Terminated))


def value_text(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
