"""Build the dependency graph of a checked program and render it (dot, mermaid, json)."""
from __future__ import annotations

import json

import networkx as nx

from cfmlang.compiler.ir import (AdapterRouteNode, AttachNode, CheckedProgram, EditNode, ExpertsNode, FinetuneNode, GrowNode,
                                 LoraExtractNode, LoraMergeNode, LoraSourceNode, LoraTrainNode, MergeNode, ModelNode,
                                 RouteNode)
from cfmlang.diagnostics import Diagnostic, warning


def build_graph(program: CheckedProgram) -> tuple[nx.DiGraph, list[Diagnostic]]:
    """Nodes are bricks and operations, edges data dependencies (input -> consumer).

    With an `output`, nodes that do not feed it are dropped with a warning.
    """
    graph = nx.DiGraph()
    for node in program.nodes:
        graph.add_node(node.name, **node_attributes(node))
    for node in program.nodes:
        for dep in node.deps:
            graph.add_edge(dep, node.name)
    notes: list[Diagnostic] = []
    if program.output is not None:
        keep = nx.ancestors(graph, program.output) | {program.output}
        for node in program.nodes:
            if node.name not in keep:
                notes.append(warning("W001", f"`{node.name}` does not feed the output "
                                     f"`{program.output}` and is dropped", node.span,
                                     "remove it, or make the output depend on it"))
        graph = graph.subgraph(sorted(keep)).copy()
    return graph, notes


def node_attributes(node) -> dict:
    if isinstance(node, ModelNode):
        return {"op": "model", "source": f'{node.source.tag} "{node.source.given}"'}
    if isinstance(node, LoraExtractNode):
        return {"op": "lora_extract", "from": node.tuned, "base": node.base, "rank": node.rank}
    if isinstance(node, ExpertsNode):
        return {"op": "experts", "from": node.model, "split": node.split, "count": node.count,
                "layers": len(node.layers)}
    if isinstance(node, RouteNode):
        return {"op": "route", "method": node.method, "experts": node.experts, "router": node.router,
                "k": node.k}
    if isinstance(node, LoraSourceNode):
        return {"op": "lora_source", "source": f'peft "{node.source.given}"', "base": node.base}
    if isinstance(node, LoraTrainNode):
        return {"op": "lora_train", "base": node.base, "rank": dict(node.options)["rank"],
                "steps": dict(node.options)["steps"]}
    if isinstance(node, LoraMergeNode):
        return {"op": "lora_merge", "method": node.combination, "inputs": [i.model for i in node.inputs]}
    if isinstance(node, AttachNode):
        return {"op": "attach", "from": node.model, "attach": list(node.adapters)}
    if isinstance(node, EditNode):
        return {"op": "update", "method": node.method, "from": node.model, "facts": len(node.facts)}
    if isinstance(node, FinetuneNode):
        return {"op": "update", "method": "finetune", "from": node.model, "train": list(node.train)}
    if isinstance(node, AdapterRouteNode):
        return {"op": "route", "method": node.method, "base": node.base, "adapters": list(node.adapters)}
    if isinstance(node, GrowNode):
        return {"op": "grow", "method": node.method, "inputs": list(node.inputs),
                "layers": node.arch.num_layers, "new_layers": list(node.arch.new_layers)}
    assert isinstance(node, MergeNode)
    return {"op": "merge", "method": node.method, "base": node.base or "",
            "inputs": [i.model for i in node.inputs], "dtype": node.dtype or ""}


def execution_order(graph: nx.DiGraph) -> list[str]:
    """A deterministic topological order (ties broken by name)."""
    return list(nx.lexicographical_topological_sort(graph))


def label(graph: nx.DiGraph, name: str) -> str:
    data = graph.nodes[name]
    if data["op"] == "model":
        return f"{name}\\n{data['source']}"
    if data["op"] == "lora_extract":
        return f"{name}\\nlora rank {data['rank']}"
    if data["op"] == "experts":
        return f"{name}\\nexperts {data['split']} x{data['count']}"
    if data["op"] == "route":
        return f"{name}\\nroute {data['method']} k={data['k']} ({data['router']})"
    if data["op"] == "lora_source":
        return f"{name}\\nlora {data['source']}"
    if data["op"] == "lora_train":
        return f"{name}\\nlora trained, rank {data['rank']}"
    if data["op"] == "lora_merge":
        return f"{name}\\nlora merge {data['method']}"
    if data["op"] == "attach":
        return f"{name}\\nfused {', '.join(data['attach'])}"
    if data["op"] == "update" and data["method"] == "finetune":
        return f"{name}\\nfinetune {len(data['train'])} bricks"
    if data["op"] == "update":
        return f"{name}\\nupdate {data['method']} ({data['facts']} facts)"
    if data["op"] == "grow":
        return f"{name}\\ngrow {data['method']}"
    return f"{name}\\nmerge {data['method']}"


def to_dot(graph: nx.DiGraph) -> str:
    lines = ["digraph cfm {", "  rankdir=LR;", "  node [shape=box, fontname=monospace];"]
    for name in execution_order(graph):
        shape = "ellipse" if graph.nodes[name]["op"] == "model" else "box"
        text = label(graph, name).replace('"', '\\"')
        lines.append(f'  "{name}" [label="{text}", shape={shape}];')
    for a, b in sorted(graph.edges):
        lines.append(f'  "{a}" -> "{b}";')
    return "\n".join(lines + ["}"]) + "\n"


def to_mermaid(graph: nx.DiGraph) -> str:
    lines = ["flowchart LR"]
    for name in execution_order(graph):
        text = label(graph, name).replace("\\n", "<br/>").replace('"', "'")
        lines.append(f'  {name}["{text}"]')
    for a, b in sorted(graph.edges):
        lines.append(f"  {a} --> {b}")
    return "\n".join(lines) + "\n"


def to_json(graph: nx.DiGraph) -> str:
    return json.dumps(graph_summary(graph), indent=2) + "\n"


def graph_summary(graph: nx.DiGraph) -> dict:
    return {"nodes": [{"name": n, **graph.nodes[n]} for n in execution_order(graph)],
            "edges": [list(e) for e in sorted(graph.edges)]}
