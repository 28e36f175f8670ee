"""Public API: parse, check, plan, compile, load."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import networkx as nx

from cfmlang import __version__
from cfmlang.frontend import ast
from cfmlang.artifact.write import (DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES, atomic_directory, copy_support_files,
                                       held_producer, held_specs, nbytes, write_adapter, write_manifest, write_shard,
                                       write_sharded)
from cfmlang.compiler.check import check as check_stage
from cfmlang.compiler.cache import Cache, link_entry, touch
from cfmlang.ops.lora.providers import AdapterProvider, OnTrainStep
from cfmlang.compiler.execute import (EditProvider, FinetuneProvider, MergeProvider, execute,
                                      make_provider, node_seed, stored_provider)
from cfmlang.ops.adapter_routes.providers import AdapterRouteProvider
from cfmlang.ops.experts.providers import RouteProvider
from cfmlang.ops.grow.providers import DepthProvider
from cfmlang.compiler.graph import build_graph, execution_order, graph_summary, node_attributes
from cfmlang.compiler.keys import node_keys
from cfmlang.compiler.plan import (CACHED, RUN, SKIP, Plan, available_memory, describe_op, make_plan,
                                  memory_refusal)
from cfmlang.compiler.lower import LowerOptions, lower_artifact, preflight, validate_target
from cfmlang.compiler.ir import (AdapterRouteNode, AttachNode, CheckedProgram, EditNode, ExpertsNode, FinetuneNode, GrowNode,
                                 LoraExtractNode, LoraMergeNode, LoraSourceNode, LoraTrainNode, MergeNode, ModelNode,
                                 RouteNode)
from cfmlang.frontend.resolve import read_source, resolve
from cfmlang.frontend.to_ast import parse as parse_text
from cfmlang.ops.grow.verify import verify_node, verify_provider
from cfmlang.io.weights import WeightError
from cfmlang.diagnostics import CompileError, Diagnostic, did_you_mean, error
from cfmlang.runtime.adapter_mixture import ADAPTERS_FILE, ROUTER_FILE, adapter_tensors
from cfmlang.runtime.routed_model import ROUTING_FILE
from cfmlang.ops.update.report import render as render_report

LANGUAGE_VERSION = "0"


@dataclass(frozen=True)
class Input:
    text: str
    file: str
    base_dir: Path


def read_input(source) -> Input:
    """A path to a .brick file, or program text (anything containing a newline)."""
    text = str(source)
    is_path = isinstance(source, Path) or ("\n" not in text and (
        text.endswith(".brick") or Path(text).is_file()))
    if is_path:
        path = Path(source)
        if not path.is_file():
            raise CompileError([error("E040", f"cannot read `{path}`: no such file",
                                      None, "check the path")])
        return Input(read_source(path, str(path)), str(path), path.resolve().parent)
    return Input(str(source), "<input>", Path.cwd())


def parse(source) -> ast.Program:
    src = read_input(source)
    return parse_text(src.text, src.file)


def check(source) -> CheckedProgram:
    src = read_input(source)
    return check_stage(resolve(src.text, src.file, src.base_dir))


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


@dataclass(frozen=True)
class Output:
    """What writing a node's output produced: its files, tensor count and bytes, and
    manifest fields of its kind (an adapter's ranks and errors ...)."""

    files: list[str]
    tensors: int
    bytes: int
    extras: dict


def compile(source, output_dir=None, *, cache_dir=None, use_cache: bool = True, force: bool = False,
            max_memory: int | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            progress: Callable[[int, int], None] | None = None, log=lambda msg: None,
            on_train_step: OnTrainStep | None = None,
            target: str = "eager", lowering: LowerOptions | None = None, node: str | None = None) -> CompileResult:
    """Check, plan, and build the output node into `output_dir` atomically; `node` names
    the node to build instead of the file's `output:`.

    With the cache (the default), every node's output is kept under `cache_dir` by its
    content key: nodes whose key is cached are not run again, and a cached output is
    hard-linked into place. Without it, the graph is streamed straight into the output.
    A plan whose estimated peak memory exceeds the available memory (or `max_memory`
    bytes, when smaller) is refused (E130) unless `force`. Without `output_dir` the artifact goes to a temporary directory that
    lives as long as the result. Tensors are computed and written `chunk_bytes` of rows
    at a time where the method allows it. `on_train_step(brick, step, steps, loss)`
    follows training bricks. A `target` other than eager also lowers the model into the
    artifact (`lowering` gives the target's options)."""
    lowering = lowering or LowerOptions(target=target)
    preflight(lowering)
    program = check(source)
    if node is not None:
        program = with_output(program, node)
    graph, dropped = build_graph(program)
    keep = None
    if output_dir is None:
        keep = tempfile.TemporaryDirectory(prefix="cfm-out-")
        output_dir = Path(keep.name) / "model"
    output_dir = Path(output_dir)
    refuse_foreign_output(output_dir)
    cache = Cache(cache_dir)
    keys, build_plan = _plan(program, graph, cache, use_cache, (max_shard_bytes, chunk_bytes),
                             _budget(force, max_memory))
    sizes = (max_shard_bytes, chunk_bytes)
    on_train_step = on_train_step or (lambda name, step, steps, loss: None)
    with _diagnosed_faults():
        if use_cache:
            manifest, stats = _build_cached(program, graph, keys, build_plan, cache, output_dir, sizes, progress, log,
                                            on_train_step, lowering)
        else:
            manifest, stats = _build_streamed(program, graph, keys, cache, output_dir, sizes, progress, log,
                                              on_train_step, lowering)
    return CompileResult(output_dir, graph, manifest, program.warnings + tuple(dropped), build_plan, stats, keep)


def plan(source, *, cache_dir=None, use_cache: bool = True, force: bool = False, max_memory: int | None = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Plan:
    """What `compile` would do: which nodes run and which are cached, with estimates.
    Raises E130 when the estimated peak memory exceeds the available memory (or
    `max_memory` bytes, when smaller), unless `force`."""
    program = check(source)
    graph, _ = build_graph(program)
    return _plan(program, graph, Cache(cache_dir), use_cache, (max_shard_bytes, chunk_bytes),
                 _budget(force, max_memory))[1]


def _budget(force: bool, max_memory: int | None) -> int | None:
    """The memory a plan may use: None (no limit) when forced."""
    if force:
        return None
    available = available_memory()
    if max_memory is None or available is None:
        return available if max_memory is None else max_memory
    return min(available, max_memory)


def _plan(program, graph, cache: Cache, use_cache: bool, sizes: tuple[int, int], budget: int | None):
    if program.output is None:
        raise CompileError([error("E070", "nothing to compile: the file sets no `output:`",
                                  None, "add a line `output: NAME` naming the node to build")])
    if program.node(program.output).node_type == "experts":
        raise CompileError([error("E182", f"`{program.output}` is an experts brick, which is not a model "
                                  "to compile", program.node(program.output).span,
                                  f"route it and compile the route: `route r: {{method: topk, experts: "
                                  f"{program.output}, k: ...}}`, `output: r`")])
    keys = node_keys(program, graph, cache.file_hash)
    build_plan = make_plan(program, graph, keys, cache, use_cache, sizes[1], sizes[0])
    refusal = memory_refusal(build_plan, program, budget)
    if refusal is not None:
        raise CompileError([refusal])
    return keys, build_plan


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


def _lower_into(tmp: Path, manifest: dict, lowering: LowerOptions, log) -> None:
    lowered = lower_artifact(tmp, manifest, lowering, log)
    if lowered is not None:
        manifest["lowered"] = lowered


def _build_streamed(program, graph, keys, cache: Cache, output_dir, sizes, progress, log, on_train_step, lowering):
    """No cache: every node's provider is wired at once and the output pulled through."""
    run = execute(program, graph, cache.root, log, on_train_step)
    verified = {name: _verified(node, verify_provider(node, run.providers[name]), log)
                for name, node in _verified_nodes(program, graph) if name != program.output}
    with atomic_directory(output_dir) as tmp:
        output = write_output(program.node(program.output), run.output, tmp, sizes, progress, log)
        manifest = build_manifest(program, graph, keys, output, verified)
        _lower_into(tmp, manifest, lowering, log)
        write_manifest(tmp, manifest)
    return manifest, {n: p.stats.tensors for n, p in run.providers.items() if hasattr(p, "stats")}


def _build_cached(program, graph, keys, build_plan: Plan, cache: Cache, output_dir, sizes, progress, log,
                  on_train_step, lowering):
    """Run the plan: each node that runs is written into the cache before its consumers
    read it back; cached nodes are read from their entries; the output entry is linked
    into the artifact."""
    providers, stats, used, verified, entries = {}, {}, set(), {}, dict(build_plan.entries)
    for name in execution_order(graph):
        status = build_plan.node(name).status
        if status == SKIP:
            continue
        if status == CACHED:
            entry = entries[name]
            log(f"`{name}`: cached")
            touch(entry.path)
            used.add(entry.path)
            verified.update(_recorded_verification(entry))
            if _holds_model(entry):
                providers[name] = stored_provider(entry.path)
            continue
        node = program.node(name)
        provider = make_provider(program, node, providers, cache.root, log, on_train_step)
        if hasattr(provider, "stats"):
            stats[name] = provider.stats
        providers[name] = provider
        upstream = {n: v for n, v in verified.items() if n in nx.ancestors(graph, name)}
        if status == RUN and keys[name] is not None and (name == program.output or _is_model(node)):
            log(f"`{name}`: running")
            entry = _store(program, node, provider, keys[name], cache, sizes,
                           progress if name == program.output else None, log, upstream)
            used.add(entry.path)
            entries[name] = entry
            verified.update(_recorded_verification(entry))
            if name != program.output:
                providers[name] = stored_provider(entry.path)
        elif isinstance(node, GrowNode) and node.tolerance is not None and name != program.output:
            verified[name] = _verified(node, verify_provider(node, provider), log)
    manifest = _place_output(program, graph, keys, entries.get(program.output), providers.get(program.output),
                             output_dir, sizes, progress, log, lowering, verified)
    cache.evict(keep=used)
    return manifest, {name: s.tensors for name, s in stats.items()}


def _is_model(node) -> bool:
    return getattr(node, "node_type", None) == "model"


def _holds_model(entry) -> bool:
    return entry.record.get("node_type") == "model"


def _store(program, node, provider, key: str, cache: Cache, sizes, progress, log, upstream: dict):
    """Write a node into the cache; the entry also records the verification of the grow
    nodes upstream (`upstream`), so that a cached output carries its whole history."""
    def write(folder: Path) -> dict:
        output = write_output(node, provider, folder, sizes, progress, log)
        if upstream:
            output = replace(output, extras={**output.extras,
                                             "verified": {**upstream, **output.extras.get("verified", {})}})
        return {"node": node.name, "op": describe_op(node_attributes(node)), "file": Path(program.root).name,
                "max_shard_bytes": sizes[0], "node_type": getattr(node, "node_type", None),
                "output": {"files": output.files, "tensors": output.tensors, "bytes": output.bytes,
                           "extras": output.extras}}
    return cache.store(key, write)


def _verified_nodes(program, graph) -> list[tuple[str, GrowNode]]:
    """The grow nodes of the graph that ask for identity verification."""
    nodes = [(name, program.node(name)) for name in execution_order(graph)]
    return [(name, node) for name, node in nodes if isinstance(node, GrowNode) and node.tolerance is not None]


def _verified(node: GrowNode, result, log) -> dict:
    log(f"verified `{node.name}`: max |Δlogit| {result.max_abs_logit_diff:.3g} against "
        f"`{result.reference}` (tolerance {result.tolerance:g})")
    return result.to_json()


def _recorded_verification(entry) -> dict[str, dict]:
    """The verification results a cache entry holds: its node's and its ancestors'."""
    return entry.record["output"]["extras"].get("verified", {})


def _place_output(program, graph, keys, entry, provider, output_dir, sizes, progress, log, lowering,
                  verified: dict) -> dict:
    """The artifact: the output's cache entry linked into place when its shard layout is
    the one asked for; otherwise (uncacheable output, other shard size) written anew."""
    with atomic_directory(output_dir) as tmp:
        if entry is not None and entry.record["max_shard_bytes"] == sizes[0]:
            link_entry(entry, tmp)
            recorded = entry.record["output"]
            output = Output(recorded["files"], recorded["tensors"], recorded["bytes"], recorded["extras"])
        else:
            output = write_output(program.node(program.output), provider, tmp, sizes, progress, log)
        manifest = build_manifest(program, graph, keys, output, verified)
        _lower_into(tmp, manifest, lowering, log)
        write_manifest(tmp, manifest)
    return manifest


def write_output(node, provider, folder: Path, sizes, progress, log) -> Output:
    """Write a node's output into `folder`: a model's safetensors shards and support
    files, or a PEFT adapter."""
    if isinstance(provider, AdapterProvider):
        return _write_adapter(provider, folder, progress, log)
    if isinstance(provider, RouteProvider):
        return _write_routed(node, provider, folder, sizes, progress, log)
    if isinstance(provider, AdapterRouteProvider):
        return _write_adapter_route(node, provider, folder, sizes, progress, log)
    specs = provider.specs
    total = sum(nbytes(s) for s in specs)
    files = write_sharded(folder, specs, provider.get, sizes[0], _on_tensor(total, progress), sizes[1])
    copy_support_files(provider.support_dir, folder, _output_dtype(provider), provider.config)
    extras = _update_record(node, provider, log)
    if isinstance(node, GrowNode) and node.tolerance is not None:
        extras["verified"] = {node.name: _verified(node, verify_node(node, provider.reference, folder), log)}
    return Output(files, len(specs), total, extras)


def _update_record(node, provider, log) -> dict:
    """What an update computed (an edit's report, a fine-tune's losses), for cfm.json;
    the edit report is also printed."""
    if isinstance(provider, EditProvider):
        log(f"edit report of `{node.name}`:\n{render_report(provider.report)}")
        return {"update": {"edited": sorted(provider.changed), "report": provider.report}}
    if isinstance(provider, FinetuneProvider):
        training = provider.training
        return {"update": {"trained": sorted(training.weights), "loss_before": training.loss_before,
                           "loss_after": training.loss_after, "loss_curve": training.loss_curve}}
    return {}


def _on_tensor(total: int, progress):
    """A write_sharded callback reporting bytes written so far to `progress`."""
    done = [0]

    def on_tensor(spec):
        done[0] += nbytes(spec)
        if progress:
            progress(done[0], total)
    return on_tensor


def _write_routed(node, provider, folder: Path, sizes, progress, log) -> Output:
    """The dense model with routed FFN neurons in expert order (HF-loadable as it is),
    routing.safetensors (neuron orders and routers), and the routing in cfm.json."""
    experts = provider.experts
    specs = provider.specs
    total = sum(nbytes(s) for s in specs)
    files = write_sharded(folder, specs, provider.get, sizes[0], _on_tensor(total, progress), sizes[1])
    routers = provider.routers()
    tensors = {f"layers.{layer}.order": experts.order(layer) for layer in experts.node.layers}
    tensors.update({f"layers.{layer}.router.{name}": tensor.contiguous()
                    for layer, built in routers.items() for name, tensor in built.tensors.items()})
    write_shard(folder / ROUTING_FILE, held_specs(tensors), held_producer(tensors))
    copy_support_files(provider.support_dir, folder, None, provider.config)
    quality = [b.captured for b in routers.values() if b.captured is not None]
    if quality:
        log(f"router `{node.router}` captures {sum(quality) / len(quality):.3f} of the top-{node.k} "
            "activation mass on held-out calibration tokens (mean over layers)")
    extras = {"standard": False, "kind": "routed-topk",
              "routing": {"method": node.method, "router": node.router, "k": node.k,
                          "count": experts.node.count, "split": experts.node.split,
                          "layers": list(experts.node.layers),
                          "captured_mass": {str(layer): built.captured for layer, built in routers.items()}}}
    return Output(files + [ROUTING_FILE], len(specs), total, extras)


def _write_adapter_route(node, provider, folder: Path, sizes, progress, log) -> Output:
    """The base model (HF-loadable as it is), adapters.safetensors (every adapter's
    factors), router.safetensors (retrieval keys or gates) and the routing in cfm.json."""
    specs = provider.specs
    total = sum(nbytes(s) for s in specs)
    files = write_sharded(folder, specs, provider.get, sizes[0], _on_tensor(total, progress), sizes[1])
    adapters = adapter_tensors(provider.adapter_modules())
    router = provider.router()
    write_shard(folder / ADAPTERS_FILE, held_specs(adapters), held_producer(adapters))
    write_shard(folder / ROUTER_FILE, held_specs(router.tensors), held_producer(router.tensors))
    copy_support_files(provider.support_dir, folder, None, provider.config)
    options = dict(node.options)
    routing = {"method": node.method, "adapters": list(node.adapters), "top_k": options["top_k"],
               "temperature": options["temperature"]}
    if node.method == "retrieve":
        routing["mix"] = options["mix"]
        routing["embed_layers"] = options["embed_layers"]
    if router.losses:
        routing["gate_training"] = {"loss_before": router.losses[0], "loss_after": router.losses[-1],
                                    "loss_curve": list(router.losses)}
        log(f"gates of `{node.name}` trained: loss {router.losses[0]:.4f} -> {router.losses[-1]:.4f}")
    extras = {"standard": False, "kind": "adapter-routed", "routing": routing}
    return Output(files + [ADAPTERS_FILE, ROUTER_FILE], len(specs), total, extras)


def _write_adapter(provider: AdapterProvider, folder: Path, progress, log) -> Output:
    """A PEFT adapter directory (with the base's support files): other programs read it
    with `source: peft "DIR"`."""
    adapter = provider.adapter(progress)
    tensors = adapter.peft_tensors()
    files = _write_peft_dir(folder, provider)
    copy_support_files(provider.support_dir, folder, None, provider.config)
    _log_adapter(provider.report, log)
    extras = {"standard": False, "kind": "peft-lora", "adapter": provider.report}
    return Output(files, len(tensors), sum(t.numel() * t.element_size() for t in tensors.values()), extras)


def _write_peft_dir(folder: Path, provider: AdapterProvider) -> list[str]:
    """A PEFT adapter directory whose base is the output's support directory (the base
    model's config and tokenizer), with the training loss curve when it was trained."""
    config = {**provider.adapter().config, "base_model_name_or_path": str(provider.support_dir.resolve())}
    files = write_adapter(folder, provider.adapter().peft_tensors(), config)
    if "loss" in provider.report:
        lines = ["step,loss"] + [f"{step},{loss:.6f}" for step, loss in enumerate(provider.report["loss"], 1)]
        (folder / "loss.csv").write_text("\n".join(lines) + "\n")
        files.append("loss.csv")
    return files


def _log_adapter(report: dict, log) -> None:
    if "relative_error" in report:
        errors = report["relative_error"]
        log(f"extracted {len(report['ranks'])} LoRA modules; relative reconstruction error "
            f"max {max(errors.values(), default=0.0):.3g}, mean {sum(errors.values()) / max(len(errors), 1):.3g}")
        if report["not_captured"]:
            log(f"warning: {len(report['not_captured'])} weights differ outside the target modules and are "
                f"not in the adapter (first: {report['not_captured'][0]})")
    if "loss" in report:
        log(f"trained {len(report['loss'])} steps; loss {report['loss'][0]:.4f} -> {report['loss'][-1]:.4f}")


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


def _output_dtype(provider) -> str | None:
    return provider.dtype if isinstance(provider, (MergeProvider, DepthProvider)) else None


def build_manifest(program: CheckedProgram, graph: nx.DiGraph, keys: dict, output: Output,
                   verified: dict | None = None) -> dict:
    """The artifact's manifest: a function of the program and its inputs' contents only
    (byte-identical for the same inputs), except `created`. `verified`: identity
    verification of grow nodes other than the output (the output's is in its extras)."""
    extras = dict(output.extras)
    verified = {**(verified or {}), **extras.pop("verified", {})}
    nodes = {}
    for name in execution_order(graph):
        node = program.node(name)
        if isinstance(node, ModelNode):
            nodes[name] = {"op": "model", "source": {"tag": node.source.tag, "given": node.source.given}}
        elif isinstance(node, LoraExtractNode):
            nodes[name] = {"op": "lora_extract", "from": node.tuned, "base": node.base,
                           "rank": node.rank, "threshold": node.threshold, "targets": list(node.targets)}
        elif isinstance(node, MergeNode):
            nodes[name] = {"op": "merge", "method": node.method, "base": node.base,
                           "dtype": node.dtype or program.dtype,
                           "seed": program.seed if node.seed is None else node.seed,
                           "options": dict(node.options),
                           "inputs": [{"model": i.model, "params": dict(i.params)} for i in node.inputs]}
        elif isinstance(node, (LoraSourceNode, LoraTrainNode, LoraMergeNode, AttachNode)):
            nodes[name] = adapter_manifest_entry(program, node)
        elif isinstance(node, ExpertsNode):
            nodes[name] = {"op": "experts", "from": node.model, "layers": list(node.layers), "split": node.split,
                           "count": node.count, "seed": node_seed(program, node),
                           "calibration": calibration_record(node.calibration)}
        elif isinstance(node, RouteNode):
            nodes[name] = {"op": "route", "method": node.method, "experts": node.experts, "router": node.router,
                           "k": node.k, "epochs": node.epochs, "seed": node_seed(program, node),
                           "calibration": calibration_record(node.calibration)}
        elif isinstance(node, EditNode):
            nodes[name] = {"op": "update", "method": node.method, "from": node.model,
                           "seed": node_seed(program, node), "options": dict(node.options),
                           "facts": len(node.facts), "neighbourhood": len(node.neighbourhood)}
        elif isinstance(node, AdapterRouteNode):
            nodes[name] = {"op": "route", "method": node.method, "base": node.base, "adapters": list(node.adapters),
                           "options": dict(node.options), "data": Path(node.data).name if node.data else None}
        elif isinstance(node, FinetuneNode):
            nodes[name] = {"op": "update", "method": "finetune", "from": node.model, "train": list(node.train),
                           "data": Path(node.data).name, "seed": node_seed(program, node),
                           "options": dict(node.options)}
        elif isinstance(node, GrowNode):
            nodes[name] = grow_manifest(node, verified.get(name))
        nodes[name]["key"] = keys[name]
    return {
        "format": "cfm-artifact", "language_version": LANGUAGE_VERSION,
        "cfmlang_version": __version__, "created": created_timestamp(),
        "source": {"file": Path(program.root).name,
                   "files": [{"file": Path(f).name, "sha256": h} for f, h in program.files]},
        "seed": program.seed, "output": program.output, "standard": True,
        "new_layers": list(program.node(program.output).arch.new_layers),
        "graph": graph_summary(graph), "nodes": nodes,
        "artifact": {"files": output.files, "tensors": output.tensors, "bytes": output.bytes},
        **output.extras,
    }


def created_timestamp() -> str:
    """The manifest's one time-dependent field: now, or SOURCE_DATE_EPOCH when set (for
    fully reproducible artifacts)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = float(epoch) if epoch and epoch.isdigit() else time.time()
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def adapter_manifest_entry(program: CheckedProgram, node) -> dict:
    if isinstance(node, LoraSourceNode):
        return {"op": "lora_source", "source": {"tag": "peft", "given": node.source.given},
                "base": node.base, "modules": len(node.modules)}
    if isinstance(node, LoraTrainNode):
        return {"op": "lora_train", "base": node.base, **dict(node.options), "data": Path(node.data.path).name,
                "data_sha256": node.data.sha256, "samples": node.data.samples}
    if isinstance(node, LoraMergeNode):
        return {"op": "lora_merge", "method": node.combination, "options": dict(node.options),
                "seed": node_seed(program, node),
                "inputs": [{"adapter": i.model, "params": dict(i.params)} for i in node.inputs]}
    return {"op": "attach", "from": node.model, "attach": list(node.adapters)}


def calibration_record(calibration) -> dict:
    """The text a node was calibrated on."""
    if calibration.origin == "probes":
        return {"probes": Path(calibration.path).name if calibration.path else "shipped probe sets",
                "tokens": calibration.tokens}
    if calibration.origin == "generated":
        return {"generated": calibration.tokens}
    return {"file": Path(calibration.path).name if calibration.path else "shipped corpus",
            "tokens": calibration.tokens}


def grow_manifest(node: GrowNode, verified: dict | None) -> dict:
    entry = {"op": "grow", "method": node.method, "inputs": list(node.inputs),
             "options": dict(node.options), "num_layers": node.arch.num_layers,
             "new_layers": list(node.arch.new_layers), "verify": verified or {"check": "none"}}
    if node.layers:
        entry["layers"] = [{"model": s.model, "layer": s.layer, "new": s.new} for s in node.layers]
    return entry


def load(directory, target: str | None = None, device: str | None = None, **kwargs):
    """The compiled model as a torch module: the lowered program when the artifact was
    compiled with a lowering target (a `LoweredModel` with `generate`), else the
    transformers model. `target="eager"` always gives the transformers model."""
    directory = Path(directory)
    if not (directory / "cfm.json").is_file():
        raise CompileError([error("E090", f"{directory} is not a cfmlang artifact (no cfm.json)",
                                  None, "compile one with `cfmc compile FILE -o DIR`")])
    from cfmlang.runtime.generation import LoweredModel, lowered_entry

    lowered = lowered_entry(directory)
    if target is not None:
        validate_target(target)
    if target == "eager" or (target is None and lowered is None):
        model = load_eager(directory, **kwargs)
        return model.to(device) if device else model
    if lowered is None or (target is not None and lowered["target"] != target):
        raise CompileError([error("E175", f"{directory} holds no `{target}` program (lowered: "
                                  f"{lowered['target'] if lowered else 'none'})", None,
                                  f"compile it with `cfmc compile FILE -o DIR --target {target}`, "
                                  "or load it with target=\"eager\"")])
    return LoweredModel(directory, lowered, device)


def load_eager(directory, manifest: dict | None = None, **kwargs):
    """The transformers model of an artifact directory: a PeftModel for adapters, routed
    FFNs replaced by `cfmlang.runtime.routed_mlp.RoutedMLP` for routed artifacts, an
    `AdapterMixture` around the base model for routes over lora bricks.
    `manifest` is the artifact's cfm.json content (read from the directory if not given)."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, **kwargs), directory)
    manifest = manifest or json.loads((directory / "cfm.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if manifest.get("kind") == "adapter-routed":
        from cfmlang.runtime.adapter_mixture import load_mixture

        return load_mixture(model, directory, manifest["routing"])
    if manifest.get("kind") == "routed-topk":
        from cfmlang.runtime.routed_model import route_model

        return route_model(model, directory, manifest["routing"])
    return model
