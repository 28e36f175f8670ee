"""One trial: the ordinary compile of a trial's program (the node cache makes what it
shares with earlier trials free) and `cfmc eval`'s scorer on the result. A trial runs
here or, as a Ray task, on a worker (every path it names on storage that worker sees)."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cfmlang.diagnostics import CompileError
from cfmlang.search.statement import Objective, objective_metric


@dataclass(frozen=True)
class TrialJob:
    number: int
    text: str               # the trial's program
    file: str               # where it is written (its diagnostics name it)
    base_dir: str           # the searched file's folder: the program's relative paths start there
    objective: Objective
    cache_dir: str | None


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    value: float | None            # None: the trial failed
    metrics: dict                  # task -> the metric the objective read
    error: str | None
    compile_seconds: float
    eval_seconds: float
    node: str | None = None        # the Ray node it ran on


def run_trial(job: TrialJob, node: str | None = None) -> TrialOutcome:
    """Compile and score one trial. A program the compile refuses (the checker, or the
    weights its values produce) makes a failed trial; a problem of the objective (a model
    without a tokenizer, a task that cannot run) is the same for every trial and stops the
    search (CompileError)."""
    from cfmlang.analysis.target import load_directory
    from cfmlang.api import Input, compile
    from cfmlang.eval import evaluate, load_task

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cfm-trial-") as scratch:
        try:
            compile(Input(job.text, job.file, Path(job.base_dir)), Path(scratch) / "model",
                    cache_dir=job.cache_dir and Path(job.cache_dir))
        except CompileError as exc:
            first = exc.diagnostics[0] if exc.diagnostics else None
            reason = f"error[{first.code}]: {first.message}" if first else str(exc)
            return TrialOutcome(job.number, None, {}, reason.splitlines()[0], time.monotonic() - start, 0.0, node)
        compiled = time.monotonic()
        loaded = load_directory(Path(scratch) / "model", f"trial {job.number}")
        tasks = [load_task(t.task) for t in job.objective.tasks]
        result = evaluate(loaded.model, loaded.tokenizer, tasks, job.objective.settings)
    metrics = {}
    value = 0.0
    for spec, scored in zip(job.objective.tasks, result.tasks):
        number = objective_metric(spec, scored.kind, scored.metrics)
        metrics[Path(spec.task).name] = number
        value += spec.weight * number
    return TrialOutcome(job.number, value, metrics, None, compiled - start, time.monotonic() - compiled, node)
