"""Public API: parse, check, compile, load."""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import networkx as nx

from cfmlang import __version__
from cfmlang.compiler import ast
from cfmlang.compiler.artifact import (DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES, atomic_directory, copy_support_files,
                                       held_producer, held_specs, nbytes, write_adapter, write_manifest, write_shard,
                                       write_sharded)
from cfmlang.compiler.check import check as check_stage
from cfmlang.compiler.execute import LoraProvider, MergeProvider, execute, input_fingerprint
from cfmlang.compiler.execute_experts import RouteProvider
from cfmlang.compiler.graph import build_graph, graph_summary
from cfmlang.compiler.ir import CheckedProgram, ExpertsNode, LoraExtractNode, MergeNode, ModelNode, RouteNode
from cfmlang.compiler.resolve import resolve
from cfmlang.compiler.to_ast import parse as parse_text
from cfmlang.compiler.weights import WeightError, default_cache_dir
from cfmlang.diagnostics import CompileError, Diagnostic, error
from cfmlang.modules.routed_model import ROUTING_FILE
from cfmlang.stdlib.lora import peft_config

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
        return Input(path.read_text(), str(path), path.resolve().parent)
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
    _keep: Any = field(default=None, repr=False)

    @cached_property
    def module(self):
        return load(self.output_dir)


def compile(source, output_dir=None, *, cache_dir=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: Callable[[int, int], None] | None = None, log=lambda msg: None) -> CompileResult:
    """Check, build the graph, and stream the output node into `output_dir` atomically.

    Without `output_dir` the artifact goes to a temporary directory that lives as long as
    the result. Tensors are computed and written `chunk_bytes` of rows at a time where the
    method allows it."""
    program = check(source)
    if program.output is None:
        raise CompileError([error("E070", "nothing to compile: the file sets no `output:`",
                                  None, "add a line `output: NAME` naming the node to build")])
    if program.node(program.output).node_type == "experts":
        raise CompileError([error("E182", f"`{program.output}` is an experts brick, which is not a model "
                                  "to compile", program.node(program.output).span,
                                  f"route it and compile the route: `route r: {{method: topk, experts: "
                                  f"{program.output}, k: ...}}`, `output: r`")])
    graph, dropped = build_graph(program)
    keep = None
    if output_dir is None:
        keep = tempfile.TemporaryDirectory(prefix="cfm-out-")
        output_dir = Path(keep.name) / "model"
    output_dir = Path(output_dir)
    refuse_foreign_output(output_dir)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    manifest = _stream(program, graph, output_dir, cache, (max_shard_bytes, chunk_bytes), progress, log)
    return CompileResult(output_dir, graph, manifest, program.warnings + tuple(dropped), keep)


def refuse_foreign_output(output_dir: Path) -> None:
    """Only an artifact of ours (or nothing) may be replaced by a compile."""
    if output_dir.is_symlink() or not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise CompileError([error("E082", f"refusing to write {output_dir}: it is a file", None,
                                  "choose another output path")])
    if any(output_dir.iterdir()) and not (output_dir / "cfm.json").is_file():
        raise CompileError([error("E082", f"refusing to replace {output_dir}: it is a non-empty "
                                  "directory that is not a cfmlang artifact", None,
                                  "choose a new output path; cfmc only replaces its own artifacts")])


def _stream(program, graph, output_dir, cache, sizes, progress, log) -> dict:
    run = execute(program, graph, cache, log)
    if isinstance(run.output, LoraProvider):
        return _write_adapter(program, graph, run, output_dir, progress, log)
    if isinstance(run.output, RouteProvider):
        return _write_routed(program, graph, run, output_dir, sizes, progress, log)
    specs = run.output.specs
    total = sum(nbytes(s) for s in specs)
    with _diagnosed_faults(), atomic_directory(output_dir) as tmp:
        files = write_sharded(tmp, specs, run.output.get, sizes[0], _on_tensor(total, progress), sizes[1])
        copy_support_files(run.output.support_dir, tmp, _output_dtype(run.output))
        manifest = build_manifest(program, graph, run, files, total)
        write_manifest(tmp, manifest)
    return manifest


def _on_tensor(total: int, progress):
    """A write_sharded callback reporting bytes written so far to `progress`."""
    done = [0]

    def on_tensor(spec):
        done[0] += nbytes(spec)
        if progress:
            progress(done[0], total)
    return on_tensor


def _write_adapter(program, graph, run, output_dir, progress, log) -> dict:
    node = program.node(program.output)
    with _diagnosed_faults():
        adapter = run.output.extract(progress or (lambda done, total: None))
        with atomic_directory(output_dir) as tmp:
            config = peft_config(adapter.ranks, list(node.targets), node.rank,
                                 str(run.output.support_dir.resolve()))
            files = write_adapter(tmp, adapter.tensors, config)
            copy_support_files(run.output.support_dir, tmp, None)
            manifest = build_manifest(program, graph, run, files,
                                      sum(t.numel() * t.element_size() for t in adapter.tensors.values()))
            manifest["standard"] = False
            manifest["kind"] = "peft-lora"
            manifest["adapter"] = {"relative_error": adapter.errors, "ranks": adapter.ranks,
                                   "not_captured": list(adapter.not_captured)}
            write_manifest(tmp, manifest)
    worst = max(adapter.errors.values(), default=0.0)
    log(f"extracted {len(adapter.ranks)} LoRA modules; relative reconstruction error "
        f"max {worst:.3g}, mean {sum(adapter.errors.values()) / max(len(adapter.errors), 1):.3g}")
    if adapter.not_captured:
        log(f"warning: {len(adapter.not_captured)} weights differ outside the target modules and are "
            f"not in the adapter (first: {adapter.not_captured[0]})")
    return manifest


def _write_routed(program, graph, run, output_dir, sizes, progress, log) -> dict:
    """The dense model with routed FFN neurons in expert order (HF-loadable as it is),
    routing.safetensors (neuron orders and routers), and the routing in cfm.json."""
    node, experts = program.node(program.output), run.output.experts
    specs = run.output.specs
    total = sum(nbytes(s) for s in specs)
    with _diagnosed_faults(), atomic_directory(output_dir) as tmp:
        files = write_sharded(tmp, specs, run.output.get, sizes[0], _on_tensor(total, progress), sizes[1])
        routers = run.output.routers()
        tensors = {f"layers.{layer}.order": experts.order(layer) for layer in experts.node.layers}
        tensors.update({f"layers.{layer}.router.{name}": tensor.contiguous()
                        for layer, built in routers.items() for name, tensor in built.tensors.items()})
        write_shard(tmp / ROUTING_FILE, held_specs(tensors), held_producer(tensors))
        copy_support_files(run.output.support_dir, tmp, None)
        manifest = build_manifest(program, graph, run, files + [ROUTING_FILE], total)
        manifest["standard"] = False
        manifest["kind"] = "routed-topk"
        manifest["routing"] = {"method": node.method, "router": node.router, "k": node.k,
                               "count": experts.node.count, "split": experts.node.split,
                               "layers": list(experts.node.layers),
                               "captured_mass": {str(layer): built.captured for layer, built in routers.items()}}
        write_manifest(tmp, manifest)
    quality = [b.captured for b in routers.values() if b.captured is not None]
    if quality:
        log(f"router `{node.router}` captures {sum(quality) / len(quality):.3f} of the top-{node.k} "
            "activation mass on held-out calibration tokens (mean over layers)")
    return manifest


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
    return provider.dtype if isinstance(provider, MergeProvider) else None


def build_manifest(program: CheckedProgram, graph: nx.DiGraph, run, files, total) -> dict:
    nodes = {}
    for name in run.order:
        node = program.node(name)
        if isinstance(node, ModelNode):
            nodes[name] = {"op": "model", "source": {"tag": node.source.tag, "given": node.source.given},
                           "fingerprint": input_fingerprint(run.providers[name])}
        elif isinstance(node, LoraExtractNode):
            nodes[name] = {"op": "lora_extract", "from": node.tuned, "base": node.base,
                           "rank": node.rank, "threshold": node.threshold, "targets": list(node.targets)}
        elif isinstance(node, ExpertsNode):
            nodes[name] = {"op": "experts", "from": node.model, "layers": list(node.layers), "split": node.split,
                           "count": node.count, "seed": run.providers[name].seed,
                           "calibration": calibration_record(node.calibration)}
        elif isinstance(node, RouteNode):
            nodes[name] = {"op": "route", "method": node.method, "experts": node.experts, "router": node.router,
                           "k": node.k, "epochs": node.epochs, "seed": run.providers[name].seed,
                           "calibration": calibration_record(node.calibration)}
        else:
            assert isinstance(node, MergeNode)
            nodes[name] = {"op": "merge", "method": node.method, "base": node.base,
                           "dtype": node.dtype or program.dtype,
                           "seed": program.seed if node.seed is None else node.seed,
                           "options": dict(node.options),
                           "inputs": [{"model": i.model, "params": dict(i.params)} for i in node.inputs]}
        nodes[name]["tensors_produced"] = run.providers[name].stats.tensors
    return {
        "format": "cfm-artifact", "language_version": LANGUAGE_VERSION,
        "cfmlang_version": __version__,
        "source": {"file": Path(program.root).name,
                   "files": [{"file": Path(f).name, "sha256": h} for f, h in program.files]},
        "seed": program.seed, "output": program.output, "standard": True,
        "graph": graph_summary(graph), "nodes": nodes,
        "artifact": {"files": files, "tensors": len(run.output.specs), "bytes": total},
    }


def calibration_record(calibration) -> dict:
    return {"file": Path(calibration.path).name if calibration.path else "shipped corpus",
            "tokens": calibration.tokens}


def load(directory, **kwargs):
    """The compiled model as a torch module: transformers' for standard architectures, a
    PeftModel for adapters, and for routed artifacts the HF model with its routed FFNs
    replaced by `cfmlang.modules.routed_mlp.RoutedMLP`."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "cfm.json").is_file():
        raise CompileError([error("E090", f"{directory} is not a cfmlang artifact (no cfm.json)",
                                  None, "compile one with `cfmc compile FILE -o DIR`")])
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, **kwargs), directory)
    manifest = json.loads((directory / "cfm.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if manifest.get("kind") == "routed-topk":
        from cfmlang.modules.routed_model import route_model

        return route_model(model, directory, manifest["routing"])
    return model
