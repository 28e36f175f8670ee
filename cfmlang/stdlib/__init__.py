"""Standard library: the registry of methods, and std/*.brick recipe files."""
from cfmlang.stdlib import adapter_routes, experts, finetune, grow, knowledge, lora, lora_combine, merge, merge_other, merge_spherical, merge_sparse  # noqa: F401  (registers the methods)
from cfmlang.stdlib.registry import REGISTRY, lookup, names_for

__all__ = ["REGISTRY", "lookup", "names_for"]
