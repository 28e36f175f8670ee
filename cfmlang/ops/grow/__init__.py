"""grow: block expansion, depth up-scaling, widening, upcycling, MoE from fine-tunes."""
from cfmlang.ops.grow import methods  # noqa: F401  (registers the methods)
