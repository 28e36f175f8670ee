"""The public API: parse, check, plan, compile, load."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import networkx as nx

from cfmlang.artifact.write import DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES
from cfmlang.compiler.build import (BuildSettings, build, memory_budget, plan_program, refuse_cache_location,
                                    refuse_foreign_output, with_output)
from cfmlang.compiler.cache import Cache
from cfmlang.compiler.check import check as check_stage
from cfmlang.compiler.executors import executor_named
from cfmlang.compiler.graph import build_graph
from cfmlang.compiler.ir import CheckedProgram
from cfmlang.compiler.lower import LowerOptions, preflight
from cfmlang.compiler.plan import Plan
from cfmlang.diagnostics import CompileError, Diagnostic, error
from cfmlang.frontend import ast
from cfmlang.frontend.resolve import checked_text, read_source, resolve
from cfmlang.frontend.to_ast import parse as parse_text
from cfmlang.ops.base import OnTrainStep, Sizes
from cfmlang.runtime.load import load
from cfmlang.search.program import SearchProgram, without_search
from cfmlang.search.program import check_search as check_search_stage

__all__ = ["parse", "check", "check_search", "plan", "compile", "load", "CompileResult"]


@dataclass(frozen=True)
class Input:
    text: str
    file: str
    base_dir: Path


def read_input(source) -> Input:
    """A path to a .brick file, program text (anything containing a newline), or an Input
    (text with the file it is reported as and the folder its paths are relative to)."""
    if isinstance(source, Input):
        return source
    text = str(source)
    is_path = isinstance(source, Path) or ("\n" not in text and (
        text.endswith(".brick") or Path(text).is_file()))
    if is_path:
        path = Path(source)
        if not path.is_file():
            raise CompileError([error("E040", f"cannot read `{path}`: no such file",
                                      None, "check the path")])
        return Input(read_source(path, str(path)), str(path), path.resolve().parent)
    return Input(checked_text(str(source), "<input>"), "<input>", Path.cwd())


def parse(source) -> ast.Program:
    src = read_input(source)
    return parse_text(src.text, src.file)


def check(source) -> CheckedProgram:
    """The checked program; a program that describes a search (open `search(...)` or
    `one_of(...)` values, a `search` statement) is refused with E264: see `check_search`."""
    src = read_input(source)
    return check_stage(without_search(resolve(src.text, src.file, src.base_dir)))


def check_search(source) -> SearchProgram:
    """Any program checked, a search included (its statement, its open values, and the
    program with each value at each end of its range); `.checked` is the program with
    every open value at its first candidate (the program itself when nothing is open)."""
    src = read_input(source)
    return check_search_stage(resolve(src.text, src.file, src.base_dir))


@dataclass
class CompileResult:
    output_dir: Path
    graph: nx.DiGraph
    manifest: dict
    warnings: tuple[Diagnostic, ...]
    plan: Plan
    stats: dict[str, int]
    """Tensors each node computed or read in this compile (NodeStats), for the nodes that
    ran and the sources they read; cached and skipped nodes do not appear."""
    _keep: Any = field(default=None, repr=False)

    @cached_property
    def module(self):
        return load(self.output_dir)


def compile(source, output_dir=None, *, cache_dir=None, use_cache: bool = True, force: bool = False,
            max_memory: int | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: Callable[[int, int], None] | None = None,
            log=lambda msg: None, on_train_step: OnTrainStep | None = None,
            target: str = "eager", lowering: LowerOptions | None = None, node: str | None = None,
            executor: str = "local", address: str | None = None,
            warn: Callable[[tuple[Diagnostic, ...]], None] | None = None) -> CompileResult:
    """Check, plan, and build the output node into `output_dir` atomically; `node` names
    the node to build instead of the file's `output:`. `warn` receives the program's
    warnings (unused nodes dropped, filters that match nothing ...) once they are known,
    before any node runs; they are also on the result.

    With the cache (the default), every node's output is kept under `cache_dir` by its
    content key: nodes whose key is cached are not run again, and a cached output is
    hard-linked into place. Without it, the graph is streamed straight into the output.
    A plan whose estimated peak memory exceeds the available memory (or `max_memory`
    bytes, when smaller) is refused (E130) unless `force`. Without `output_dir` the
    artifact goes to a temporary directory that lives as long as the result. Tensors are
    computed and written `chunk_bytes` of rows at a time where the method allows it.
    `on_train_step(brick, step, steps, loss)` follows training bricks. A `target` other
    than eager also lowers the model into the artifact (`lowering` gives its options).
    `executor="ray"` computes the tensors of merges on the Ray cluster at `address` (None:
    the one this process is connected to, else a new local one); the artifact is the same."""
    lowering = lowering or LowerOptions(target=target)
    preflight(lowering)
    runner = executor_named(executor, address)
    program = check(source)
    if node is not None:
        program = with_output(program, node)
    graph, dropped = build_graph(program)
    warnings = program.warnings + tuple(dropped)
    if warn is not None and warnings:
        warn(warnings)
    keep = None
    if output_dir is None:
        keep = tempfile.TemporaryDirectory(prefix="cfm-out-")
        output_dir = Path(keep.name) / "model"
    output_dir = Path(output_dir)
    refuse_foreign_output(output_dir)
    cache = Cache(cache_dir)
    refuse_cache_location(cache.root, output_dir)
    sizes = Sizes(max_shard_bytes, chunk_bytes)
    keys, build_plan = plan_program(program, graph, cache, use_cache, sizes, memory_budget(force, max_memory))
    settings = BuildSettings(sizes, progress, log, on_train_step or (lambda name, step, steps, loss: None),
                             lowering, runner)
    manifest, stats = build(program, graph, keys, build_plan, cache, output_dir, use_cache, settings)
    return CompileResult(output_dir, graph, manifest, warnings, build_plan, stats, keep)


def plan(source, *, cache_dir=None, use_cache: bool = True, force: bool = False, max_memory: int | None = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Plan:
    """What `compile` would do: which nodes run and which are cached, with estimates.
    Raises E130 when the estimated peak memory exceeds the available memory (or
    `max_memory` bytes, when smaller), unless `force`."""
    program = check(source)
    graph, _ = build_graph(program)
    sizes = Sizes(max_shard_bytes, chunk_bytes)
    return plan_program(program, graph, Cache(cache_dir), use_cache, sizes, memory_budget(force, max_memory))[1]
