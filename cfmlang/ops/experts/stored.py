"""An experts brick in the cache: the neuron order of every routed layer (the partition)
and the FFN inputs its calibration computed, so that a later compile reading the brick
(a route with another `k` or router) neither splits nor calibrates again."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from cfmlang.artifact.write import held_producer, held_specs, write_shard
from cfmlang.io.weights import NodeStats
from cfmlang.ops.base import Output
from cfmlang.ops.experts.providers import ExpertsProvider

PARTITION_FILE = "partition.safetensors"
STORED_TENSOR = re.compile(r"^layers\.(?P<layer>\d+)\.(?P<what>order|inputs)$")


def write_partition(provider: ExpertsProvider, folder: Path) -> Output:
    """partition.safetensors: `layers.L.order` for every routed layer, `layers.L.inputs`
    for the calibration inputs computed while splitting."""
    tensors = {f"layers.{layer}.order": provider.order(layer) for layer in provider.node.layers}
    tensors.update({f"layers.{layer}.inputs": inputs.contiguous() for layer, inputs in provider.own_inputs().items()})
    write_shard(folder / PARTITION_FILE, held_specs(tensors), held_producer(tensors))
    extras = {"standard": False, "kind": "experts-partition", "seed": provider.seed,
              "calibrated": bool(provider.own_inputs())}
    return Output([PARTITION_FILE], len(tensors), sum(t.numel() * t.element_size() for t in tensors.values()), extras)


def partition_bytes(node) -> int:
    """The entry's size: an int64 order per routed layer, and for a cooccurrence split the
    float32 FFN inputs of at most `tokens` calibration tokens per routed layer."""
    orders = len(node.layers) * node.arch.intermediate_size * 8
    inputs = len(node.layers) * node.calibration.tokens * node.arch.hidden_size * 4 if node.split == "cooccurrence" else 0
    return orders + inputs


def restore_partition(node, folder: Path, record: dict, model) -> ExpertsProvider:
    """The brick's provider over `model` (its source's provider) with the stored partition."""
    provider = ExpertsProvider(node, model, record["output"]["extras"]["seed"], NodeStats())
    stored: dict[str, dict[int, torch.Tensor]] = {"order": {}, "inputs": {}}
    for name, tensor in load_file(folder / PARTITION_FILE).items():
        match = STORED_TENSOR.match(name)
        stored[match["what"]][int(match["layer"])] = tensor
    provider.adopt(stored["order"], stored["inputs"])
    return provider
