"""The artifact's manifest (cfm.json): the language version, the source files and their
hashes, the graph, and each node's entry as its operation writes it."""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import networkx as nx

from cfmlang.compiler.graph import execution_order, graph_summary
from cfmlang.compiler.ir import CheckedProgram
from cfmlang.ops.base import Output, operation_of
from cfmlang.version import __version__

LANGUAGE_VERSION = "0"


def build_manifest(program: CheckedProgram, graph: nx.DiGraph, keys: dict, output: Output,
                   verified: dict | None = None) -> dict:
    """The artifact's manifest: a function of the program and its inputs' contents only
    (byte-identical for the same inputs), except `created`. `verified`: the checks of
    nodes other than the output (the output's own check is in its extras); the output's
    extras under `node` join its entry in `nodes`, the others are top-level fields."""
    extras = dict(output.extras)
    verified = {**(verified or {}), **extras.pop("verified", {})}
    own = extras.pop("node", {})
    nodes = {}
    for name in execution_order(graph):
        node = program.node(name)
        nodes[name] = {**operation_of(node).manifest(program, node, verified.get(name)),
                       **(own if name == program.output else {}), "key": keys[name]}
    return {
        "format": "cfm-artifact", "language_version": LANGUAGE_VERSION,
        "cfmlang_version": __version__, "created": created_timestamp(),
        "source": {"file": Path(program.root).name,
                   "files": [{"file": Path(f).name, "sha256": h} for f, h in program.files]},
        "seed": program.seed, "output": program.output, "standard": True,
        "new_layers": list(program.node(program.output).arch.new_layers),
        "graph": graph_summary(graph), "nodes": nodes,
        "artifact": {"files": output.files, "tensors": output.tensors, "bytes": output.bytes},
        **extras,
    }


def created_timestamp() -> str:
    """The manifest's one time-dependent field: now, or SOURCE_DATE_EPOCH when set (for
    fully reproducible artifacts)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = float(epoch) if epoch and epoch.isdigit() else time.time()
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
