"""Execute the graph: each node becomes a lazy tensor provider, built by its operation
from the providers of its inputs; the output node's tensors are pulled one at a time into
the artifact, so nothing is held whole."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from cfmlang.compiler.graph import execution_order
from cfmlang.compiler.ir import CheckedProgram
from cfmlang.io.provider import Provider
from cfmlang.ops.base import BuildContext, OnTrainStep, operation_of


@dataclass(frozen=True)
class Execution:
    output: Provider
    providers: dict[str, Provider]
    order: tuple[str, ...]


def execute(program: CheckedProgram, graph: nx.DiGraph, cache_dir: Path, log=print,
            on_train_step: OnTrainStep = lambda name, step, steps, loss: None) -> Execution:
    """Open every source and wire the providers in dependency order (no math yet)."""
    context = BuildContext(program, cache_dir, log, on_train_step)
    providers: dict[str, Provider] = {}
    order = execution_order(graph)
    for name in order:
        providers[name] = make_provider(context, program.node(name), providers)
    return Execution(providers[program.output], providers, tuple(order))


def make_provider(context: BuildContext, node, providers: dict[str, Provider]) -> Provider:
    """The lazy provider of one node, reading from the providers of its inputs."""
    return operation_of(node).provider(context, node, providers)
