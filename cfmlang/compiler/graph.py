"""Build the dependency graph of a checked program and render it (dot, mermaid, json)."""
from __future__ import annotations

import json

import networkx as nx

from cfmlang.compiler.ir import CheckedProgram
from cfmlang.diagnostics import Diagnostic, warning
from cfmlang.ops.base import operation_of


def build_graph(program: CheckedProgram) -> tuple[nx.DiGraph, list[Diagnostic]]:
    """Nodes are bricks and operations, edges data dependencies (input -> consumer).

    With an `output`, nodes that do not feed it are dropped with a warning.
    """
    graph = nx.DiGraph(labels={})
    for node in program.nodes:
        operation = operation_of(node)
        attributes = operation.attributes(node)
        graph.add_node(node.name, **attributes)
        graph.graph["labels"][node.name] = operation.label(node.name, attributes)
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
    """A node's attributes in the graph, as its operation describes it."""
    return operation_of(node).attributes(node)


def execution_order(graph: nx.DiGraph) -> list[str]:
    """A deterministic topological order (ties broken by name)."""
    return list(nx.lexicographical_topological_sort(graph))


def label(graph: nx.DiGraph, name: str) -> str:
    """The node's two-line label (name, then what its operation does)."""
    return graph.graph["labels"][name]


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
