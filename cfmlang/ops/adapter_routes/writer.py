"""Writing a route over lora bricks: the base model (HF-loadable as it is),
adapters.safetensors (every adapter's factors), router.safetensors (retrieval keys or
gates) and the routing in cfm.json."""
from __future__ import annotations

from pathlib import Path

from cfmlang.artifact.write import held_producer, held_specs, write_shard
from cfmlang.ops.base import Output, Sizes, write_model
from cfmlang.runtime.adapter_mixture import ADAPTERS_FILE, ROUTER_FILE, adapter_tensors


def write_adapter_route(node, provider, folder: Path, sizes: Sizes, progress, log) -> Output:
    """The base model (HF-loadable as it is), adapters.safetensors (every adapter's
    factors), router.safetensors (retrieval keys or gates) and the routing in cfm.json."""
    model = write_model(provider, folder, sizes, progress)
    adapters = adapter_tensors(provider.adapter_modules())
    router = provider.router()
    write_shard(folder / ADAPTERS_FILE, held_specs(adapters), held_producer(adapters))
    write_shard(folder / ROUTER_FILE, held_specs(router.tensors), held_producer(router.tensors))
    options = dict(node.options)
    routing = {"method": node.method, "adapters": list(node.adapters), "top_k": options["top_k"],
               "temperature": options["temperature"]}
    if node.method == "retrieve":
        routing["mix"] = options["mix"]
        routing["embed_layers"] = options["embed_layers"]
    if router.losses:
        routing["gate_training"] = {"loss_before": router.losses[0], "loss_after": router.losses[-1],
                                    "loss_curve": list(router.losses)}
        log(f"gates of `{node.name}` trained: loss {router.losses[0]:.4f} -> {router.losses[-1]:.4f}")
    extras = {"standard": False, "kind": "adapter-routed", "routing": routing}
    return Output(model.files + [ADAPTERS_FILE, ROUTER_FILE], model.tensors, model.bytes, extras)
