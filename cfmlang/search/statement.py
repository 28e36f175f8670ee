"""The `search NAME:` statement checked into a `SearchSpec`:

    search best:
      target: blend                    # the node every trial builds
      objective:
        minimize:                      # or maximize:
          - {task: "tune.txt", weight: 1.0}
          - {task: "choices.jsonl", metric: acc, weight: -0.5}
        limit: 200                     # optional: cfmc eval's settings
      budget: 16                       # trials
      seed: 0
      sampler: cmaes                   # cmaes (default), tpe, random
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cfmlang.diagnostics import CompileError, Diagnostic, Span, did_you_mean, error
from cfmlang.eval.kinds import KINDS
from cfmlang.eval.runner import Settings
from cfmlang.eval.tasks import load_task
from cfmlang.frontend import ast

SAMPLERS = ("cmaes", "tpe", "random")
DIRECTIONS = ("minimize", "maximize")
KEYS = ("target", "objective", "budget", "seed", "sampler")
TASK_KEYS = ("task", "weight", "metric")
SETTING_KEYS = ("limit", "batch_size", "context", "stride", "max_new_tokens")
"""Evaluation settings an objective may set (those of `cfmc eval`)."""
DEFAULT_BUDGET = 20
MAX_BUDGET = 100_000
OBJECTIVE_HINT = 'e.g. `objective: {minimize: [{task: "heldout.txt", weight: 1.0}]}`'


@dataclass(frozen=True)
class ObjectiveTask:
    """One task of the objective: the file (or a shipped task's name), the metric read from
    its result, and its weight in the sum."""

    task: str
    metric: str | None       # None: the kind's headline metric (lm-eval: its first)
    weight: float
    span: Span


@dataclass(frozen=True)
class Objective:
    direction: str           # minimize | maximize
    tasks: tuple[ObjectiveTask, ...]
    settings: Settings


@dataclass(frozen=True)
class SearchSpec:
    name: str
    span: Span
    target: str
    objective: Objective
    budget: int
    seed: int
    sampler: str


def check_statement(decl: ast.Decl, base_dir: Path, declared: set[str],
                    problems: list[Diagnostic]) -> SearchSpec | None:
    """The statement's spec, or None with its problems (E262) reported."""
    before = len(problems)
    body = decl.body if isinstance(decl.body, ast.MapValue) else None
    if body is None:
        problems.append(error("E262", f"the body of `search {decl.name}` must be a map of `key: value` lines",
                              decl.span, "give it `target:`, `objective:`, and optionally `budget:`, `seed:`, `sampler:`"))
        return None
    for entry in body.entries:
        if entry.key not in KEYS:
            problems.append(error("E262", f"unknown key `{entry.key}` in `search {decl.name}`", entry.key_span,
                                  did_you_mean(entry.key, KEYS) or f"the keys: {', '.join(KEYS)}"))
    target = _target(decl, body, declared, problems)
    objective = _objective(decl, body, base_dir, problems)
    budget = _whole(body, "budget", DEFAULT_BUDGET, 1, MAX_BUDGET, problems)
    seed = _whole(body, "seed", 0, 0, 2**32 - 1, problems)
    sampler = _sampler(body, problems)
    if len(problems) > before or None in (target, objective, budget, seed, sampler):
        return None
    return SearchSpec(decl.name, decl.span, target, objective, budget, seed, sampler)


def _target(decl: ast.Decl, body: ast.MapValue, declared: set[str], problems: list) -> str | None:
    entry = body.get("target")
    if entry is None:
        problems.append(error("E262", f"`search {decl.name}` needs a `target:`", decl.name_span,
                              "name the node each trial builds and measures, e.g. `target: blend`"))
        return None
    value = entry.value
    if not (isinstance(value, ast.Ref) and value.is_plain):
        problems.append(error("E262", f"`target` must name a node, not {ast.describe(value)}",
                              getattr(value, "span", entry.key_span)))
        return None
    if value.name not in declared:
        problems.append(error("E262", f"unknown node `{value.name}` as the search target", value.span,
                              did_you_mean(value.name, declared) or "name a node declared in the file"))
        return None
    return value.name


def _whole(body: ast.MapValue, key: str, default: int, low: int, high: int, problems: list) -> int | None:
    entry = body.get(key)
    if entry is None:
        return default
    value = entry.value
    if isinstance(value, ast.Number) and isinstance(value.value, int) and low <= value.value <= high:
        return value.value
    problems.append(error("E262", f"`{key}` must be a whole number from {low} to {high}", value.span))
    return None


def _sampler(body: ast.MapValue, problems: list) -> str | None:
    entry = body.get("sampler")
    if entry is None:
        return SAMPLERS[0]
    value = entry.value
    word = value.name if isinstance(value, ast.Ref) and value.is_plain else None
    if word in SAMPLERS:
        return word
    problems.append(error("E262", f"unknown sampler {f'`{word}`' if word else ast.describe(value)}", value.span,
                          did_you_mean(word or "", SAMPLERS) or f"the samplers: {', '.join(SAMPLERS)}"))
    return None


def _objective(decl: ast.Decl, body: ast.MapValue, base_dir: Path, problems: list) -> Objective | None:
    entry = body.get("objective")
    if entry is None:
        problems.append(error("E262", f"`search {decl.name}` needs an `objective:`", decl.name_span, OBJECTIVE_HINT))
        return None
    value = entry.value
    if not isinstance(value, ast.MapValue):
        problems.append(error("E262", f"`objective` must be a map, not {ast.describe(value)}", value.span,
                              OBJECTIVE_HINT))
        return None
    directions = [e for e in value.entries if e.key in DIRECTIONS]
    for extra in value.entries:
        if extra.key not in DIRECTIONS + SETTING_KEYS:
            problems.append(error("E262", f"unknown key `{extra.key}` in the objective", extra.key_span,
                                  did_you_mean(extra.key, DIRECTIONS + SETTING_KEYS) or
                                  f"the keys: {', '.join(DIRECTIONS + SETTING_KEYS)}"))
    if len(directions) != 1:
        problems.append(error("E262", "the objective needs exactly one of `minimize:` and `maximize:`",
                              directions[1].key_span if directions else value.span, OBJECTIVE_HINT))
        return None
    tasks = _tasks(directions[0].value, base_dir, problems)
    settings = _settings(value, problems)
    if tasks is None or settings is None:
        return None
    return Objective(directions[0].key, tasks, settings)


def _tasks(value: ast.Value, base_dir: Path, problems: list) -> tuple[ObjectiveTask, ...] | None:
    items = value.items if isinstance(value, ast.ListValue) else (value,)
    if not items:
        problems.append(error("E262", "the objective has no task", value.span, OBJECTIVE_HINT))
        return None
    tasks = [_task(item, base_dir, problems) for item in items]
    return None if None in tasks else tuple(tasks)


def _task(item: ast.Value, base_dir: Path, problems: list) -> ObjectiveTask | None:
    if isinstance(item, (ast.String, ast.Ref)):
        item = ast.MapValue((ast.Entry("task", item.span, item),), item.span)
    if not isinstance(item, ast.MapValue):
        problems.append(error("E262", f"an objective task must be a map or a task name, not {ast.describe(item)}",
                              item.span, OBJECTIVE_HINT))
        return None
    for entry in item.entries:
        if entry.key not in TASK_KEYS:
            problems.append(error("E262", f"unknown key `{entry.key}` in an objective task", entry.key_span,
                                  did_you_mean(entry.key, TASK_KEYS) or f"the keys: {', '.join(TASK_KEYS)}"))
    task, weight, metric = item.get("task"), item.get("weight"), item.get("metric")
    if task is None or not isinstance(task.value, (ast.String, ast.Ref)) or \
            isinstance(task.value, ast.Ref) and not task.value.is_plain:
        problems.append(error("E262", "an objective task needs `task:`, a task file (relative to this file) or "
                              "the name of a shipped task", item.span, OBJECTIVE_HINT))
        return None
    if weight is not None and not (isinstance(weight.value, ast.Number) and weight.value.value != 0):
        problems.append(error("E262", "`weight` must be a number other than 0", weight.value.span,
                              "a negative weight counts a metric against the direction (accuracy under minimize)"))
        return None
    if metric is not None and not isinstance(metric.value, (ast.String, ast.Ref)):
        problems.append(error("E262", f"`metric` must be a metric's name, not {ast.describe(metric.value)}",
                              metric.value.span))
        return None
    name = task.value.value if isinstance(task.value, ast.String) else task.value.name
    path = str(base_dir / name) if (base_dir / name).is_file() else name
    metric_name = None if metric is None else (
        metric.value.value if isinstance(metric.value, ast.String) else metric.value.name)
    if not _known_task(path, metric_name, task.value.span, metric, problems):
        return None
    return ObjectiveTask(path, metric_name, float(weight.value.value) if weight else 1.0, task.value.span)


def _known_task(path: str, metric: str | None, span: Span, metric_entry, problems: list) -> bool:
    """Whether the task loads (its problems placed at the task's value when they name no
    place of their own) and reports `metric`."""
    try:
        task = load_task(path)
    except CompileError as exc:
        problems += [d if d.span is not None else error(d.code, d.message, span, *d.help, notes=d.notes)
                     for d in exc.diagnostics]
        return False
    known = KINDS[task.kind].metrics
    if metric is not None and known and metric not in known:
        problems.append(error("E262", f"task `{task.name}` ({task.kind}) has no metric `{metric}`",
                              metric_entry.value.span, did_you_mean(metric, known) or f"its metrics: {', '.join(known)}"))
        return False
    return True


def _settings(value: ast.MapValue, problems: list) -> Settings | None:
    given = {}
    for key in SETTING_KEYS:
        entry = value.get(key)
        if entry is None:
            continue
        if not (isinstance(entry.value, ast.Number) and isinstance(entry.value.value, int)):
            problems.append(error("E262", f"`{key}` must be a whole number", entry.value.span))
            return None
        given[key] = entry.value.value
    settings = Settings(**given)
    found = settings.problems()
    if found:
        problems += [error("E262", d.message.replace("--", "").replace("-", "_"), value.span) for d in found]
        return None
    return settings


def objective_metric(task: ObjectiveTask, kind: str, metrics: dict) -> float:
    """The number of one task's result the objective reads (its metric, else the kind's
    headline, else the first reported)."""
    name = task.metric or (KINDS[kind].metrics[0] if KINDS[kind].metrics else next(iter(metrics)))
    if name not in metrics:
        raise CompileError([error("E262", f"task `{Path(task.task).name}` reported no metric `{name}`", task.span,
                                  f"its metrics: {', '.join(metrics)}")])
    return float(metrics[name])
