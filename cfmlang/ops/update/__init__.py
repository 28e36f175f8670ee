"""update: knowledge edits (ROME, MEMIT) and fine-tuning of selected bricks."""
from cfmlang.ops.update import finetune, knowledge  # noqa: F401  (registers the methods)
