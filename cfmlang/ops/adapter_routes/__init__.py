"""Routes over lora bricks: per-sequence retrieval and per-token gates."""
from cfmlang.ops.adapter_routes import methods  # noqa: F401  (registers the methods)
