"""The `export` target: a `torch.export` program with dynamic batch, sequence and cache length.

The KV cache is preallocated by the caller and updated in place (the program records
the caches as mutated inputs), so decoding one token copies nothing. Saved with
`torch.export.save` as `lowered/model.pt2`; `torch.export.load` reads it back.

A model with routed FFNs gets two programs, each with its routed layers in one
exportable formulation: `prefill.pt2` (dense-masked, any number of tokens) and
`decode.pt2` (gather: one token per sequence, only the chosen experts' weights read).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from cfmlang.compiler.lower.decoder import CachedDecoder, empty_cache
from cfmlang.compiler.lower.packing import swapped
from cfmlang.compiler.lower.passes import require_no_data_dependent_ops
from cfmlang.diagnostics import CompileError, error
from cfmlang.runtime.routed_mlp import RoutedMLP

PROGRAM = "model.pt2"
MAX_BATCH = 1024
EXAMPLE = (2, 5, 16)          # batch, sequence, cache length: distinct, none of them 0 or 1


def lower(model: nn.Module, out_dir: Path, options, log) -> dict:
    files = {}
    for name, program in export_programs(model, functional_cache=False).items():
        require_no_data_dependent_ops(program, f"export ({name})")
        file = PROGRAM if name == "program" else f"{name}.pt2"
        torch.export.save(program, out_dir / file)
        files[name] = f"lowered/{file}"
    log(f"exported {', '.join(files.values())}: dynamic batch, sequence and cache length; "
        "KV cache updated in place")
    return {"files": files, "cache": "in_place", **program_facts(model)}


def program_facts(model: nn.Module) -> dict:
    return {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "max_length": model.config.max_position_embeddings,
            "routed_layers": len(routed_layers(model))}


def routed_layers(model: nn.Module) -> list[RoutedMLP]:
    return [module for module in model.modules() if isinstance(module, RoutedMLP)]


@contextlib.contextmanager
def formulation(model: nn.Module, kind: str | None):
    """Routed layers set to `kind` ("masked" or "gather") while tracing."""
    routed = routed_layers(model) if kind else []
    before = [module.formulation for module in routed]
    for module in routed:
        module.formulation = kind
    try:
        yield
    finally:
        for module, previous in zip(routed, before):
            module.formulation = previous


def export_programs(model: nn.Module, functional_cache: bool,
                    packed: dict[str, nn.Module] | None = None) -> dict[str, torch.export.ExportedProgram]:
    """One dynamic program; or, for routed models and when `packed` names layers to swap
    in for decoding, a prefill program (routed layers masked) and a one-token decode
    program (routed layers gathering, `packed` layers in place)."""
    if not routed_layers(model) and not packed:
        return {"program": export_dynamic(model, functional_cache)}
    with formulation(model, "masked"):
        prefill = export_dynamic(model, functional_cache)
    with formulation(model, "gather"), swapped(model, packed or {}):
        decode = export_dynamic(model, functional_cache, one_token=True)
    return {"prefill": prefill, "decode": decode}


def example_inputs(config, batch: int, length: int, cache_length: int, dtype, device):
    ids = torch.arange(batch * length, device=device).reshape(batch, length) % config.vocab_size
    positions = torch.arange(length, device=device)
    keys, values = empty_cache(config, batch, cache_length, dtype, device)
    return ids, positions, keys, values


def export_dynamic(model: nn.Module, functional_cache: bool, one_token: bool = False) -> torch.export.ExportedProgram:
    """Export the cached decoder with batch, sequence and cache length all dynamic (the
    sequence length fixed at 1 with `one_token`)."""
    config = model.config
    limit = config.max_position_embeddings
    batch, length = Dim("batch", min=1, max=MAX_BATCH), Dim("sequence", min=1, max=limit)
    cache = Dim("cache", min=2, max=limit)
    parameter = next(model.parameters())
    example_batch, example_length, example_cache = EXAMPLE
    args = example_inputs(config, example_batch, 1 if one_token else example_length, example_cache,
                          parameter.dtype, parameter.device)
    cache_shapes = [{0: batch, 2: cache}] * config.num_hidden_layers
    token_shapes = ({0: batch}, None) if one_token else ({0: batch, 1: length}, {0: length})
    shapes = (*token_shapes, cache_shapes, cache_shapes)
    return run_export(CachedDecoder(model, functional_cache).eval(), args, shapes)


def run_export(decoder: nn.Module, args, shapes) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(decoder, args, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # torch reports untraceable code with many exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompileError([error("E174", f"torch.export could not trace the model: {first}", None,
                                  "a layer of this model is not exportable; compile with `--target eager`")]) from None
