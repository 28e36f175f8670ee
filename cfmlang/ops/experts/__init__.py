"""Expert bricks (FFN neuron partitions) and top-k routes over them."""
from cfmlang.ops.experts import methods  # noqa: F401  (registers the methods)
