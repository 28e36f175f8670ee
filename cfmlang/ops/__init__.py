"""Operations, one package each (merge, lora, grow, update, experts, adapter_routes),
and the registry of their methods. Importing this package registers every shipped method."""
from cfmlang.ops import adapter_routes, experts, grow, lora, merge, update  # noqa: F401  (registers the methods)
from cfmlang.ops.registry import REGISTRY, lookup, names_for

__all__ = ["REGISTRY", "lookup", "names_for"]
