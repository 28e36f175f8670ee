"""lm-evaluation-harness tasks (the `lm_eval` package, extra `eval`) through its Python
API: HFLM wraps the in-memory model and tokenizer, the task is the YAML config read by
tasks.py (local `dataset_path: json` data, so no download)."""
from __future__ import annotations

from cfmlang.diagnostics import CompileError, error
from cfmlang.eval.scoring import Scored
from cfmlang.eval.tasks import Task


class HarnessKind:
    metrics: tuple[str, ...] = ()     # whatever the task's config reports

    def steps(self, task: Task, tokenizer, settings) -> int:
        return 1

    def score(self, task: Task, model, tokenizer, settings, tick) -> Scored:
        evaluator, model_class, task_manager = harness_modules(task)
        config = task.items[0]
        language_model = model_class(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
                                     device=str(model.device))
        try:
            output = evaluator.simple_evaluate(model=language_model, tasks=[config], limit=settings.limit,
                                               log_samples=True, bootstrap_iters=0, verbosity="ERROR",
                                               task_manager=task_manager(include_defaults=False))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
            raise failed(task, f"{type(exc).__name__}: {str(exc)[:300]}") from None
        tick()
        name = config["task"]
        samples = output["samples"].get(name, [])
        return Scored(metrics_of(output["results"][name]), tuple(map(sample_details, samples)), len(samples))


def harness_modules(task: Task):
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CompileError([error("E232", f"task `{task.name}` is an lm-eval task, and lm_eval is not installed",
                                  None, "pip install 'cfmlang[eval]' (or pip install lm_eval)")]) from None
    return evaluator, HFLM, TaskManager   # TaskManager without lm-eval's own tasks: no indexing


def metrics_of(results: dict) -> dict:
    """`acc,none` -> `acc`; standard errors and the alias left out."""
    return {key.split(",")[0]: value for key, value in results.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))}


def sample_details(sample: dict) -> dict:
    details = {"doc_id": sample["doc_id"]}
    responses = sample.get("filtered_resps") or []
    if responses and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in responses):
        details["loglikelihoods"] = [float(r[0]) for r in responses]
    for key in sample.get("metrics", []):
        details[key] = sample.get(key)
    return details


def failed(task: Task, reason: str) -> CompileError:
    return CompileError([error("E232", f"lm-eval cannot run task `{task.name}` ({task.path}): {reason}", None,
                               "check the YAML against lm-eval's task guide; local data needs "
                               "`dataset_path: json` and `dataset_kwargs: {data_files: ...}`")])
