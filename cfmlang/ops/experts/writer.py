"""Writing a routed model: the dense model with its routed FFN neurons in expert order
(HF-loadable as it is), routing.safetensors (neuron orders and routers), and the routing
in cfm.json."""
from __future__ import annotations

from pathlib import Path

from cfmlang.artifact.write import held_producer, held_specs, write_shard
from cfmlang.ops.base import Output, Sizes, write_model
from cfmlang.runtime.routed_model import ROUTING_FILE


def write_routed(node, provider, folder: Path, sizes: Sizes, progress, log) -> Output:
    """The dense model with routed FFN neurons in expert order (HF-loadable as it is),
    routing.safetensors (neuron orders and routers), and the routing in cfm.json."""
    experts = provider.experts
    model = write_model(provider, folder, sizes, progress)
    routers = provider.routers()
    tensors = {f"layers.{layer}.order": experts.order(layer) for layer in experts.node.layers}
    tensors.update({f"layers.{layer}.router.{name}": tensor.contiguous()
                    for layer, built in routers.items() for name, tensor in built.tensors.items()})
    write_shard(folder / ROUTING_FILE, held_specs(tensors), held_producer(tensors))
    quality = [b.captured for b in routers.values() if b.captured is not None]
    if quality:
        log(f"router `{node.router}` captures {sum(quality) / len(quality):.3f} of the top-{node.k} "
            "activation mass on held-out calibration tokens (mean over layers)")
    extras = {"standard": False, "kind": "routed-topk",
              "routing": {"method": node.method, "router": node.router, "k": node.k,
                          "count": experts.node.count, "split": experts.node.split,
                          "layers": list(experts.node.layers),
                          "captured_mass": {str(layer): built.captured for layer, built in routers.items()}}}
    return Output(model.files + [ROUTING_FILE], model.tensors, model.bytes, extras)


def calibration_record(calibration) -> dict:
    """The text a node was calibrated on."""
    if calibration.origin == "probes":
        return {"probes": Path(calibration.path).name if calibration.path else "shipped probe sets",
                "tokens": calibration.tokens}
    if calibration.origin == "generated":
        return {"generated": calibration.tokens}
    return {"file": Path(calibration.path).name if calibration.path else "shipped corpus",
            "tokens": calibration.tokens}
