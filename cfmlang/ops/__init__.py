"""Operations, one package each (merge, lora, grow, update, experts, adapter_routes),
and the registry of their methods. Importing this package registers every shipped
operation and method."""
from cfmlang.ops import adapter_routes, experts, grow, lora, merge, model, update  # noqa: F401  (registers them)
from cfmlang.ops.registry import REGISTRY, lookup, names_for

__all__ = ["REGISTRY", "lookup", "names_for"]
