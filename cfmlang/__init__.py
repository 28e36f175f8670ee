"""cfmlang: a declarative language and compiler for configurable foundation models."""
from cfmlang.api import check, check_search, compile, load, parse, plan
from cfmlang.version import __version__

__all__ = ["parse", "check", "check_search", "plan", "compile", "load", "__version__"]
