"""cfmlang: a declarative language and compiler for configurable foundation models."""
from cfmlang.api import check, compile, load, parse, plan
from cfmlang.version import __version__

__all__ = ["parse", "check", "plan", "compile", "load", "__version__"]
