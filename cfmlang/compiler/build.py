"""The build loop: plan a checked program, run its nodes (through the node cache, or
streamed straight into the output), and write the artifact atomically with its manifest.

Every node is run by its operation (provider, writer, check, manifest entry); nothing
here knows one operation from another.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import networkx as nx

from cfmlang.artifact.card import write_card
from cfmlang.artifact.manifest import build_manifest
from cfmlang.artifact.write import atomic_directory, write_manifest
from cfmlang.compiler.cache import Cache, link_entry, touch
from cfmlang.compiler.execute import execute, make_provider
from cfmlang.compiler.executors import LOCAL, Executor, NodeJob
from cfmlang.compiler.graph import execution_order, node_attributes
from cfmlang.compiler.ir import CheckedProgram
from cfmlang.compiler.keys import node_keys
from cfmlang.compiler.lower import LowerOptions, lower_artifact
from cfmlang.compiler.plan import CACHED, RUN, SKIP, Plan, available_memory, describe_op, make_plan, memory_refusal
from cfmlang.diagnostics import CompileError, did_you_mean, error
from cfmlang.io.weights import WeightError
from cfmlang.ops.base import BuildContext, OnTrainStep, Output, Progress, Sizes, operation_of


@dataclass(frozen=True)
class BuildSettings:
    """How a compile writes and reports: shard and chunk sizes, progress of the output's
    bytes, log lines, training steps, the lowering target, and where tensors are computed."""

    sizes: Sizes
    progress: Progress | None
    log: Callable[[str], None]
    on_train_step: OnTrainStep
    lowering: LowerOptions
    executor: Executor = LOCAL


def plan_program(program: CheckedProgram, graph: nx.DiGraph, cache: Cache, use_cache: bool, sizes: Sizes,
                 budget: int | None) -> tuple[dict, Plan]:
    """The content key of every node and the plan (E070 without an output, E130 over the
    memory budget)."""
    if program.output is None:
        raise CompileError([error("E070", "nothing to compile: the file sets no `output:`",
                                  None, "add a line `output: NAME` naming the node to build")])
    output = program.node(program.output)
    refusal = operation_of(output).refuse_output(output)
    if refusal is not None:
        raise CompileError([refusal])
    keys = node_keys(program, graph, cache.file_hash)
    build_plan = make_plan(program, graph, keys, cache, use_cache, sizes.chunk_bytes, sizes.shard_bytes)
    refusal = memory_refusal(build_plan, program, budget)
    if refusal is not None:
        raise CompileError([refusal])
    return keys, build_plan


def memory_budget(force: bool, max_memory: int | None) -> int | None:
    """The memory a plan may use: None (no limit) when forced."""
    if force:
        return None
    available = available_memory()
    if max_memory is None or available is None:
        return available if max_memory is None else max_memory
    return min(available, max_memory)


def with_output(program: CheckedProgram, node: str) -> CheckedProgram:
    """The program with `node` as its output (E160 when no node has that name)."""
    names = [n.name for n in program.nodes]
    if node not in names:
        raise CompileError([error("E160", f"`{Path(program.root).name}` declares no node named `{node}`",
                                  None, did_you_mean(node, names) or f"its nodes: {', '.join(names)}")])
    return dataclasses.replace(program, output=node)


def refuse_foreign_output(output_dir: Path) -> None:
    """Only an artifact of ours (or nothing) may be replaced by a compile."""
    if output_dir.is_symlink():
        raise CompileError([error("E142", f"refusing to write {output_dir}: it is a symbolic link "
                                  f"(to {os.readlink(output_dir)})", None,
                                  "compile never writes through or replaces a link; give the real "
                                  "path, or remove the link")])
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise CompileError([error("E082", f"refusing to write {output_dir}: it is a file", None,
                                  "choose another output path")])
    if any(output_dir.iterdir()) and not (output_dir / "cfm.json").is_file():
        raise CompileError([error("E082", f"refusing to replace {output_dir}: it is a non-empty "
                                  "directory that is not a cfmlang artifact", None,
                                  "choose a new output path; cfmc only replaces its own artifacts")])


def refuse_cache_location(cache_root: Path, output_dir: Path) -> None:
    """E214 for a cache that compiling would destroy or cannot use: the output directory
    itself or a folder inside it (replacing the output removes it), or a file."""
    root, output = cache_root.resolve(), output_dir.resolve()
    if root == output or output in root.parents:
        raise CompileError([error("E214", f"the cache directory {cache_root} is inside the output {output_dir}, "
                                  "which every compile replaces whole", None,
                                  "give --cache-dir (or CFM_CACHE_DIR) a folder outside the output")])
    if root.exists() and not root.is_dir():
        raise CompileError([error("E214", f"the cache directory {cache_root} is a file", None,
                                  "give --cache-dir (or CFM_CACHE_DIR) a folder")])


def build(program: CheckedProgram, graph: nx.DiGraph, keys: dict, build_plan: Plan, cache: Cache,
          output_dir: Path, use_cache: bool, settings: BuildSettings) -> tuple[dict, dict[str, int]]:
    """Run the plan into `output_dir`: (manifest, tensors computed or read per node).
    Weight and disk faults become diagnostics, and nothing is written."""
    with _diagnosed_faults():
        if use_cache:
            return _build_cached(program, graph, keys, build_plan, cache, output_dir, settings)
        return _build_streamed(program, graph, keys, cache, output_dir, settings)


def write_output(node, provider, folder: Path, settings: BuildSettings, progress: Progress | None,
                 job: NodeJob) -> Output:
    """Write a node's output into `folder`, as its operation writes it, its tensors computed
    by the executor."""
    provider = settings.executor.provider(job, provider, settings.sizes, settings.log)
    return operation_of(node).write(node, provider, folder, settings.sizes, progress, settings.log)


def node_job(program: CheckedProgram, graph: nx.DiGraph, name: str, cache: Cache, entries: dict) -> NodeJob:
    """What an executor needs to compute `name` elsewhere; `entries`: the cache entries
    written or found so far (those holding models are read back, not computed)."""
    needed = nx.ancestors(graph, name) | {name}
    stored = tuple((n, str(e.path), e.record) for n, e in entries.items()
                   if n in needed and n != name and operation_of(program.node(n)).restorable(program.node(n)))
    return NodeJob(program, name, tuple(n for n in execution_order(graph) if n in needed), cache.root, stored)


def _build_streamed(program, graph, keys, cache: Cache, output_dir, settings: BuildSettings):
    """No cache: every node's provider is wired at once and the output pulled through."""
    run = execute(program, graph, cache.root, settings.log, settings.on_train_step)
    verified = {}
    for name in execution_order(graph):
        node = program.node(name)
        if name != program.output and (check := operation_of(node).verify(node, run.providers[name],
                                                                            settings.log)) is not None:
            verified[name] = check
    with atomic_directory(output_dir) as tmp:
        output = write_output(program.node(program.output), run.output, tmp, settings, settings.progress,
                              node_job(program, graph, program.output, cache, {}))
        manifest = _finish(tmp, program, graph, keys, output, verified, settings, cache)
    return manifest, {n: p.stats.tensors for n, p in run.providers.items() if hasattr(p, "stats")}


def _build_cached(program, graph, keys, build_plan: Plan, cache: Cache, output_dir, settings: BuildSettings):
    """Run the plan: each node that runs is written into the cache before its consumers
    read it back; cached nodes are read from their entries; the output entry is linked
    into the artifact."""
    context = BuildContext(program, cache.root, settings.log, settings.on_train_step)
    providers, stats, used, verified, entries = {}, {}, set(), {}, dict(build_plan.entries)
    for name in execution_order(graph):
        status = build_plan.node(name).status
        if status == SKIP:
            continue
        if status == CACHED:
            entry = entries[name]
            settings.log(f"`{name}`: cached")
            touch(entry.path)
            used.add(entry.path)
            verified.update(_recorded_verification(entry))
            node, operation = program.node(name), operation_of(program.node(name))
            if operation.restorable(node):
                providers[name] = operation.restore(node, entry.path, entry.record, providers)
            continue
        node = program.node(name)
        operation = operation_of(node)
        provider = make_provider(context, node, providers)
        if hasattr(provider, "stats"):
            stats[name] = provider.stats
        providers[name] = provider
        if status == RUN and keys[name] is not None and (name == program.output or operation.restorable(node)):
            settings.log(f"`{name}`: running")
            upstream = {n: v for n, v in verified.items() if n in nx.ancestors(graph, name)}
            entry = _store(program, node, provider, keys[name], cache, settings, upstream,
                           node_job(program, graph, name, cache, entries))
            used.add(entry.path)
            entries[name] = entry
            verified.update(_recorded_verification(entry))
            if name != program.output:
                providers[name] = operation.restore(node, entry.path, entry.record, providers)
        elif name != program.output and (check := operation.verify(node, provider, settings.log)):
            verified[name] = check
    manifest = _place_output(program, graph, keys, entries.get(program.output), providers.get(program.output),
                             output_dir, settings, verified, cache, node_job(program, graph, program.output, cache, entries))
    cache.evict(keep=used)
    return manifest, {name: s.tensors for name, s in stats.items()}


def _store(program, node, provider, key: str, cache: Cache, settings: BuildSettings, upstream: dict,
           job: NodeJob):
    """Write a node into the cache; the entry also records the checks of the nodes
    upstream (`upstream`), so that a cached output carries its whole history."""
    progress = settings.progress if node.name == program.output else None

    def write(folder: Path) -> dict:
        output = write_output(node, provider, folder, settings, progress, job)
        if upstream:
            output = replace(output, extras={**output.extras,
                                             "verified": {**upstream, **output.extras.get("verified", {})}})
        return {"node": node.name, "op": describe_op(node_attributes(node)), "file": Path(program.root).name,
                "max_shard_bytes": settings.sizes.shard_bytes, "node_type": getattr(node, "node_type", None),
                "output": {"files": output.files, "tensors": output.tensors, "bytes": output.bytes,
                           "extras": output.extras}}
    return cache.store(key, write)


def _recorded_verification(entry) -> dict[str, dict]:
    """The checks a cache entry holds: its node's and its ancestors'."""
    return entry.record["output"]["extras"].get("verified", {})


def _place_output(program, graph, keys, entry, provider, output_dir, settings: BuildSettings,
                  verified: dict, cache: Cache, job: NodeJob) -> dict:
    """The artifact: the output's cache entry linked into place when its shard layout is
    the one asked for; otherwise (uncacheable output, other shard size) written anew."""
    with atomic_directory(output_dir) as tmp:
        if entry is not None and entry.record["max_shard_bytes"] == settings.sizes.shard_bytes:
            link_entry(entry, tmp)
            recorded = entry.record["output"]
            output = Output(recorded["files"], recorded["tensors"], recorded["bytes"], recorded["extras"])
        else:
            output = write_output(program.node(program.output), provider, tmp, settings, settings.progress, job)
        manifest = _finish(tmp, program, graph, keys, output, verified, settings, cache)
    return manifest


def _finish(tmp: Path, program, graph, keys, output: Output, verified: dict, settings: BuildSettings,
            cache: Cache) -> dict:
    """Complete the artifact in `tmp` around its written output: the manifest, the lowered
    program, the model card; then make sure no input changed while it was built."""
    manifest = build_manifest(program, graph, keys, output, verified)
    _lower_into(tmp, manifest, settings)
    write_manifest(tmp, manifest)
    write_card(tmp, program, manifest, cache.file_hash)
    cache.require_unchanged_inputs()
    return manifest


def _lower_into(tmp: Path, manifest: dict, settings: BuildSettings) -> None:
    lowered = lower_artifact(tmp, manifest, settings.lowering, settings.log)
    if lowered is not None:
        manifest["lowered"] = lowered


@contextlib.contextmanager
def _diagnosed_faults():
    """Weight and disk faults while writing become diagnostics (nothing is written)."""
    try:
        yield
    except WeightError as exc:
        raise CompileError([error(getattr(exc, "code", "E080"), str(exc), exc.span,
                                  exc.help or "the input weights are damaged or the merge is "
                                  "numerically unstable", "nothing was written")]) from None
    except OSError as exc:
        raise CompileError([error("E081", f"cannot write the output: {exc}", None,
                                  "check free disk space and permissions; nothing was written")]) from None
