"""merge: weight-space merges of whole models (mergekit semantics)."""
from cfmlang.ops.merge import linear, other, sparse, spherical  # noqa: F401  (registers the methods)
