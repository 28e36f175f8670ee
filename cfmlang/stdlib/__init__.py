"""Standard library: the registry of methods, and std/*.brick recipe files."""
from cfmlang.stdlib import merge, planned  # noqa: F401  (registers the methods)
from cfmlang.stdlib.registry import REGISTRY, lookup, names_for

__all__ = ["REGISTRY", "lookup", "names_for"]
