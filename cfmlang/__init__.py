"""cfmlang: a declarative language and compiler for configurable foundation models."""
__version__ = "0.1.0"

from cfmlang.api import check, compile, load, parse, plan  # noqa: E402

__all__ = ["parse", "check", "plan", "compile", "load", "__version__"]
