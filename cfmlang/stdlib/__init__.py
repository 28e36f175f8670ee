"""Standard library: the registry of methods, and std/*.brick recipe files."""
from cfmlang.stdlib import adapter_routes, experts, finetune, grow, knowledge, lora, lora_combine, merge, merge_other, merge_spherical, merge_sparse  # noqa: F401  (registers the methods)
from cfmlang.stdlib.merge_base import MERGEKIT_METHODS
from cfmlang.stdlib.registry import REGISTRY, lookup, names_for
from cfmlang.stdlib.registry import planned as _planned

# every mergekit method parses today; those without a class yet answer E031
_planned("merge", " ".join(m for m in MERGEKIT_METHODS if ("merge", m) not in REGISTRY),
         "the merge issue")

__all__ = ["REGISTRY", "lookup", "names_for"]
