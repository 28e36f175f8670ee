"""The `inductor` target: an AOTInductor package compiled from the exported program.

The weights are stored in the package as they are, without Inductor's `freezing`
(`INDUCTOR_CONFIGS`). Freezing (which Inductor applies whenever grad is off) would
constant-fold every weight expression: a packed layer's codes would be rebuilt into
float32 at compile time (SmolLM2's decode package grew from 215 MB to 656 MB), and its
oneDNN-prepacked linears sum in another order than eager's (prefill logits no longer
bit-identical). The KV cache is updated in place, as in the export target: the program
writes the new keys and values into the caller's cache tensors at `positions` (AOTInductor
keeps the mutation of a program input as a write into that input's buffer), so a decode
step copies nothing but the new token's entries and returns only the logits.

Float32 linear layers whose weights are exact GGUF block values are packed for decoding
(see `packing`): the package then holds a prefill program with float32 weights and a
one-token decode program that reads the block codes, either rebuilt into float32 inside
cfmlang's native kernel (`--decode-kernel exact`, eager's weights bit for bit; the package
calls `torch.ops.cfmlang.*`, which `runtime.native` loads before the package) or
multiplied by torch's weight-only int4/int8 CPU kernels with bfloat16 activations
(`bf16`, `bf16x2`: see `runtime.packed_linear.KernelLinear` for their error). Saved as `lowered/model_inductor.pt2`,
or `prefill_inductor.pt2` and `decode_inductor.pt2` (packed or routed models, see
`export`); loaded with `torch._inductor.aoti_load_package`.

Three ops are left to ATen instead of becoming Inductor-generated code (`aten_kernels`):
`mean` (the RMSNorms' mean of squares) and the rotary `cos`/`sin`. Inductor sums in another
order and has its own cos/sin, and over SmolLM2's 30 layers those last-bit differences
grew to 1.5e-4 in the logits of a routed model. With ATen's kernels, SmolLM2's float32
prefill programs (dense and routed) compute eager's bits: the projections, attention and
activations already did. The ATen calls cost nothing `cfmc bench` can measure.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from cfmlang.compiler.lower.export import export_programs, program_facts, routed_layers
from cfmlang.compiler.lower.packing import PACKED_DECODE_MAX_BATCH, pack_linears
from cfmlang.compiler.lower.passes import require_no_data_dependent_ops

PACKAGE = "model_inductor.pt2"
EAGER_BIT_OPS = (torch.ops.aten.mean.dim, torch.ops.aten.cos.default, torch.ops.aten.sin.default)
INDUCTOR_CONFIGS = {"freezing": False}


def lower(model: nn.Module, out_dir: Path, options, log) -> dict:
    packed, packing = packed_layers(model, options, log)
    files = {}
    for name, program in export_programs(model, functional_cache=False, packed=packed).items():
        require_no_data_dependent_ops(program, f"inductor ({name})")
        file = PACKAGE if name == "program" else f"{name}_inductor.pt2"
        log(f"compiling {file} with AOTInductor; minutes for a real model")
        compile_package(program, out_dir / file, log)
        files[name] = f"lowered/{file}"
    return {"files": files, "cache": "in_place", **program_facts(model), **packing}


def compile_package(program: torch.export.ExportedProgram, path: Path, log, configs: dict = INDUCTOR_CONFIGS) -> None:
    """AOTInductor package of `program` at `path`, with ATen's means and cos/sin."""
    with aten_kernels(log):
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)


def packed_layers(model: nn.Module, options, log) -> tuple[dict, dict]:
    """The layers to pack for decoding, and the manifest's `packing` entry."""
    if not options.pack_weights or next(model.parameters()).dtype != torch.float32:
        return {}, {}
    packed, report = pack_linears(model, options.decode_kernel)
    log(f"weight packing: {report.describe()}")
    if not packed:
        return {}, {}
    entry = {"q4_1": report.q4_1, "q8_0": report.q8_0, "float32": report.float32, "routed": report.routed,
             "kernel": options.decode_kernel,
             "decode_weight_bytes": report.packed_bytes, "float32_weight_bytes": report.float32_bytes}
    if not routed_layers(model):
        entry["decode_max_batch"] = PACKED_DECODE_MAX_BATCH
    return packed, {"packing": entry}


@contextlib.contextmanager
def aten_kernels(log):
    """While compiling, the EAGER_BIT_OPS run as calls to ATen's kernels (what eager runs) rather than
    as Inductor-generated code. Inductor has no public switch for this: the lowering table
    entries are replaced and restored, and a torch whose internals differ compiles with
    Inductor's own code (logged)."""
    from torch._inductor import lowering

    table = getattr(lowering, "lowerings", None)
    realized = getattr(lowering, "needs_realized_inputs", None)
    handler = getattr(lowering, "fallback_handler", None)
    if table is None or realized is None or handler is None:
        log("this torch's Inductor cannot leave means and rotary cos/sin to ATen: logits may differ "
            "from eager in the last bits")
        yield
        return
    saved = {op: (table.get(op), op in realized) for op in EAGER_BIT_OPS}
    for op in EAGER_BIT_OPS:
        realized.add(op)
        table[op] = handler(op, add_to_fallback_set=False)
    shim_warnings = logging.getLogger("torch._inductor.ir")   # "... has no c-shim": expected
    level = shim_warnings.level
    shim_warnings.setLevel(logging.ERROR)
    try:
        yield
    finally:
        shim_warnings.setLevel(level)
        for op, (lowered, was_realized) in saved.items():
            if lowered is None:
                table.pop(op, None)
            else:
                table[op] = lowered
            if not was_realized:
                realized.discard(op)
