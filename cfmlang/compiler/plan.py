"""The build plan: which nodes run and which come from the cache, with estimates of bytes
read and written, peak memory and time. Computed from the checked program and the cache
alone (no weight is read); `compile` follows the same plan it would print.

Estimates (documented in docs/cli.md):
- bytes read by a running node: the outputs of the nodes it reads, whole;
  bytes written: its own output when it is the output, or (with the cache) its cache
  entry when others read it (`Operation.stored_bytes`: a model's tensors, an expert
  partition); a source writes only when a GGUF file is converted;
- peak memory: a process baseline plus the largest working set of a running node (with
  the cache every node is written before its consumers read it; without it the graph is
  pulled through at once and the working sets add up). A merge's working set is
  (2 * inputs + 3) float32 blocks of `chunk_bytes` for elementwise methods, and
  (3 * inputs + 4) float32 copies of the largest tensor for the others (task vectors,
  masks, the held result); benchmarks/plan_rates.py compares these with measured peaks.
  Other kinds (edits, fine-tuning, expert splits, routers) run the model: their inputs
  whole in float32, four times over (weights, gradients, optimiser moments);
- time: each operation's `seconds`: merges, attachments, grows and adapter combinations
  the bytes they read or write over a rate measured per method; kinds that run a model
  (training, edits, fine-tuning, expert calibration, routers) the FLOPs of the passes they
  make over their tokens (benchmarks/plan_rates.py measures both rates).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from cfmlang.compiler.cache import Cache, Entry
from cfmlang.compiler.graph import execution_order
from cfmlang.compiler.ir import CheckedProgram
from cfmlang.diagnostics import Diagnostic, error
from cfmlang.ops.base import SourceCost, input_specs, operation_of

RUN, CACHED, READ, SKIP = "run", "cached", "read", "skip"
BASELINE_BYTES = 400 * 1024**2
"""Resident memory of the compiler process before any weight (python, torch, transformers)."""
@dataclass(frozen=True)
class NodePlan:
    name: str
    op: str
    key: str | None
    status: str
    bytes_read: int
    bytes_written: int
    peak_bytes: int
    seconds: float | None


@dataclass(frozen=True)
class Plan:
    output: str
    nodes: tuple[NodePlan, ...]
    streamed: bool
    """True without the cache: the whole graph is pulled through at once."""
    entries: dict[str, Entry] = field(default_factory=dict)
    """The cache entries the plan reuses, by node."""

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.name == name)

    @property
    def working(self) -> tuple[NodePlan, ...]:
        return tuple(n for n in self.nodes if n.status in (RUN, READ))

    @property
    def bytes_read(self) -> int:
        return sum(n.bytes_read for n in self.working)

    @property
    def bytes_written(self) -> int:
        return sum(n.bytes_written for n in self.working)

    @property
    def peak_bytes(self) -> int:
        peaks = [n.peak_bytes for n in self.working] or [0]
        return BASELINE_BYTES + (sum(peaks) if self.streamed else max(peaks))

    @property
    def seconds(self) -> float | None:
        times = [n.seconds for n in self.working]
        return None if None in times else sum(times)


def make_plan(program: CheckedProgram, graph: nx.DiGraph, keys: dict[str, str | None],
              cache: Cache, use_cache: bool, chunk_bytes: int, shard_bytes: int) -> Plan:
    sources = {name: operation_of(program.node(name)).source_cost(program.node(name), cache) for name in graph}
    entries = _reusable(program, graph, keys, cache, shard_bytes, sources) if use_cache else {}
    needed = _needed(program, program.output, entries)
    nodes = []
    for name in execution_order(graph):
        status = (SKIP if name not in needed else CACHED if name in entries
                  else READ if sources[name] is not None else RUN)
        nodes.append(_estimate(program, graph, program.node(name), keys[name], status, sources[name], chunk_bytes,
                               use_cache))
    return Plan(program.output, tuple(nodes), not use_cache,
                {name: entry for name, entry in entries.items() if name in needed})


def _reusable(program, graph, keys, cache: Cache, shard_bytes: int, sources: dict) -> dict[str, Entry]:
    """Cached entries: for a node others read, one its operation can restore (a model's
    tensors in any shard layout, a lora brick, an expert partition); for the output, such
    an entry or any other kind of output in the shard layout asked for. Sources
    (`sources[name]` not None) are never cached."""
    found = {}
    for name in graph.nodes:
        if keys[name] is None or sources[name] is not None:
            continue
        entry = cache.lookup(keys[name])
        if entry is None:
            continue
        node = program.node(name)
        if operation_of(node).restorable(node) or (
                name == program.output and entry.record.get("max_shard_bytes") == shard_bytes):
            found[name] = entry
    return found


def _needed(program: CheckedProgram, output: str, entries: dict) -> set[str]:
    """Nodes whose output this compile reads: from the output down to cached nodes (and
    the inputs of cached nodes whose entries are read with them)."""
    needed, todo = set(), [output]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        node = program.node(name)
        if name not in entries or operation_of(node).restore_reads_inputs(node):
            todo.extend(node.deps)
    return needed


def _estimate(program, graph, node, key, status, source: SourceCost | None, chunk_bytes: int,
              use_cache: bool) -> NodePlan:
    op = describe_op(graph.nodes[node.name])
    if status not in (RUN, READ):
        return NodePlan(node.name, op, key, status, 0, 0, 0, 0.0)
    operation = operation_of(node)
    if source is not None:
        return NodePlan(node.name, f"{op}, {source.note}" if source.note else op, key, READ, source.bytes_read,
                        source.bytes_written, source.peak_bytes, source.seconds)
    read = sum(s.nbytes for d in node.deps for s in input_specs(program, d))
    stored = node.name == program.output or (use_cache and operation.restorable(node))
    written = operation.stored_bytes(program, node) if stored else 0
    peak = operation.working_set(program, node, chunk_bytes)
    return NodePlan(node.name, op, key, status, read, written, peak, operation.seconds(program, node, read))


def describe_op(attributes: dict) -> str:
    """`merge ties`, `model`, `route topk` ...: a graph node's operation and method."""
    return " ".join(str(attributes[k]) for k in ("op", "method") if k in attributes)


def available_memory() -> int | None:
    """Memory a new allocation can get now: MemAvailable, capped by a cgroup limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return _cgroup_cap(available)


def _cgroup_cap(available: int | None) -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return available
    if limit == "max":
        return available
    room = max(int(limit) - used, 0)
    return room if available is None else min(available, room)


def memory_refusal(plan: Plan, program: CheckedProgram, available: int | None) -> Diagnostic | None:
    """E130 when the plan's estimated peak memory exceeds `available` bytes."""
    if available is None or plan.peak_bytes <= available:
        return None
    worst = max(plan.working, key=lambda n: n.peak_bytes)
    return error("E130", f"this compile needs an estimated {human(plan.peak_bytes)} of memory at its "
                 f"peak (node `{worst.name}`: {human(worst.peak_bytes)}), but only {human(available)} "
                 "is available", program.node(worst.name).span,
                 "free memory, raise --max-memory, or pass --force to run anyway (the estimate is "
                 "conservative)")


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def plan_table(plan: Plan, available: int | None = None) -> str:
    """The plan as a text table, one line per node, then the totals."""
    available = available_memory() if available is None else available
    rows = [("node", "op", "status", "read", "written", "peak memory", "time")]
    for n in plan.nodes:
        working = n.status in (RUN, READ)
        rows.append((n.name, n.op, n.status, human(n.bytes_read) if working else "-",
                     human(n.bytes_written) if working else "-",
                     human(n.peak_bytes) if working and n.peak_bytes else "-",
                     _seconds(n.seconds) if working else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    counts = {s: sum(1 for n in plan.nodes if n.status == s) for s in (RUN, CACHED)}
    lines.append(f"{counts[RUN]} to run, {counts[CACHED]} cached; reads {human(plan.bytes_read)}, "
                 f"writes {human(plan.bytes_written)}")
    room = f" of {human(available)} available" if available is not None else ""
    lines.append(f"peak memory ~{human(plan.peak_bytes)}{room}; time ~{_seconds(plan.seconds)}")
    return "\n".join(lines) + "\n"


def plan_json(plan: Plan) -> dict:
    return {"output": plan.output, "streamed": plan.streamed,
            "nodes": [{"name": n.name, "op": n.op, "key": n.key, "status": n.status,
                       "bytes_read": n.bytes_read, "bytes_written": n.bytes_written,
                       "peak_bytes": n.peak_bytes, "seconds": n.seconds} for n in plan.nodes],
            "bytes_read": plan.bytes_read, "bytes_written": plan.bytes_written,
            "peak_bytes": plan.peak_bytes, "available_bytes": available_memory(), "seconds": plan.seconds}


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
