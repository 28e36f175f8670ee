"""`evaluate(model, tokenizer, tasks)`: every task scored on one in-memory model."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cfmlang.diagnostics import CompileError, error
from cfmlang.eval.kinds import KINDS
from cfmlang.eval.tasks import Task, load_task

DEFAULT_CONTEXT, DEFAULT_STRIDE = 512, 256


@dataclass(frozen=True)
class Settings:
    limit: int | None = None        # items per task (tokens for perplexity); None: all
    batch_size: int = 8             # continuations scored per forward pass
    context: int = DEFAULT_CONTEXT  # perplexity window, tokens
    stride: int = DEFAULT_STRIDE    # perplexity: tokens predicted per window
    max_new_tokens: int = 32        # generation default when a record gives no max_tokens

    def problems(self) -> list:
        found = []
        if self.limit is not None and self.limit < 1:
            found.append("--limit must be a positive whole number")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            found.append("--batch-size and --max-new-tokens must be positive")
        if not 1 <= self.stride < self.context:
            found.append(f"the stride ({self.stride}) must be at least 1 and below the context ({self.context})")
        return [error("E233", f"invalid evaluation setting: {p}", None, "see `cfmc eval --help`") for p in found]


@dataclass(frozen=True)
class TaskResult:
    task: str
    kind: str
    items: int
    metrics: dict       # metric name -> value
    details: tuple      # one dict per item
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    model: str
    tasks: tuple[TaskResult, ...]

    def metric(self, task: str, name: str) -> float:
        return next(t.metrics[name] for t in self.tasks if t.task == task)


def evaluate(model, tokenizer, tasks, settings: Settings = Settings(), title: str = "model",
             progress: Callable[[str, int], Callable[[], None]] = lambda title, steps: (lambda: None)) -> EvalResult:
    """Score `tasks` (Task objects, files or shipped names) on `model`; `progress(title, steps)`
    announces each task and returns the function marking one step done."""
    problems = settings.problems()
    if problems:
        raise CompileError(problems)
    loaded = [task if isinstance(task, Task) else load_task(task) for task in tasks]
    model.eval()
    return EvalResult(title, tuple(run_task(task, model, tokenizer, settings, progress) for task in loaded))


def run_task(task: Task, model, tokenizer, settings: Settings, progress) -> TaskResult:
    kind = KINDS[task.kind]
    tick = progress(f"{task.name} ({task.kind})", kind.steps(task, tokenizer, settings))
    start = time.monotonic()
    scored = kind.score(task, model, tokenizer, settings, tick)
    return TaskResult(task.name, task.kind, scored.items, scored.metrics, scored.details, time.monotonic() - start)
