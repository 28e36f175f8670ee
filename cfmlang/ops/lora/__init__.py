"""LoRA bricks: PEFT directories, training, extraction, merges of adapters, attach."""
from cfmlang.ops.lora import combine, factors  # noqa: F401  (registers the methods)
