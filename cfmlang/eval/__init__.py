"""`cfmc eval`: perplexity, multiple-choice, generation and lm-evaluation-harness tasks
on a compiled model, callable from Python as `evaluate(model, tokenizer, tasks)`.

Modules: tasks.py (task definitions, file formats, the shipped pack), scoring.py (the
numbers: NLL windows, continuation log-likelihoods, greedy answers), kinds.py (one small
class per task kind, in a registry), harness.py (lm-eval tasks), runner.py (evaluate),
report.py (table and JSON)."""
from cfmlang.eval.runner import EvalResult, Settings, TaskResult, evaluate
from cfmlang.eval.tasks import Task, load_task, shipped_tasks

__all__ = ["EvalResult", "Settings", "Task", "TaskResult", "evaluate", "load_task", "shipped_tasks"]
