"""Load a routed artifact: the dense HF model with its routed FFNs replaced by RoutedMLP.

The artifact is an ordinary HF checkpoint (FFN neurons ordered expert by expert, which
does not change the dense model's function) plus `routing.safetensors`:
`layers.N.order` (the original index of each neuron, for analysis) and
`layers.N.router.*` (the router's tensors), and the `routing` section of cfm.json
(`router`, `k`, `count`, `layers`).
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from cfmlang.architectures import layer_module
from cfmlang.runtime.routed_mlp import RoutedMLP, make_router

ROUTING_FILE = "routing.safetensors"


def route_model(model, directory, routing: dict):
    """Replace the FFN of every routed layer of `model` (the dense model loaded from
    `directory`) by a RoutedMLP; returns the model."""
    tensors = load_file(Path(directory) / ROUTING_FILE)
    for layer in routing["layers"]:
        prefix = f"layers.{layer}.router."
        own = {name[len(prefix):]: tensor.to(model.dtype) if tensor.is_floating_point() else tensor
               for name, tensor in tensors.items() if name.startswith(prefix)}
        block = layer_module(model, layer)
        router = make_router(routing["router"], own, block.mlp.act_fn, routing["count"])
        block.mlp = RoutedMLP.from_dense(block.mlp, routing["count"], router, routing["k"])
        block.mlp.neuron_order = tensors.get(f"layers.{layer}.order")     # for packing (lower.packing)
    return model
