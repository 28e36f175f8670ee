"""Lowering: a compiled artifact's model as an exported, Inductor or TensorRT program.

`lower_artifact` runs after the weights are written (inside the artifact's temporary
directory, so a failed lowering leaves nothing behind) and returns the manifest's
`lowered` entry. Each target lives in its own module; the passes every program goes
through before it is saved are in `passes`. The program targets write torch programs that
`cfmlang.load` runs; the file targets (`gguf`) write a model file for other runtimes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cfmlang.artifact.programs import NATIVE_TARGETS, record_trusted
from cfmlang.diagnostics import CompileError, did_you_mean, error

PROGRAM_TARGETS = ("export", "inductor", "tensorrt")
FILE_TARGETS = ("gguf",)
TARGETS = ("eager",) + PROGRAM_TARGETS + FILE_TARGETS
PRECISIONS = ("float32", "float16", "bfloat16")
DECODE_KERNELS = ("exact", "bf16", "bf16x2")
"""How the inductor decode program multiplies by packed weights (see `packing`)."""
LOWERED_DIR = "lowered"


@dataclass(frozen=True)
class LowerOptions:
    """`precision` casts the graph (default: the artifact's dtype; tensorrt: float16).
    `batch`, `prompt_length` and `cache_length` are the static shapes of the tensorrt
    programs; export and inductor programs take any batch, prompt and cache length.
    `pack_weights`: the inductor decode program reads float32 weights that are exact GGUF
    block values as their block codes (see `packing`); `decode_kernel` says how the decode
    program multiplies by them (`packing.DECODE_KERNELS`: `exact` rebuilds eager's float32
    weights, `bf16`/`bf16x2` use torch's int4 CPU kernels). `quant`: the gguf target's
    weight type (see `gguf_file.QUANTS`)."""

    target: str = "eager"
    device: str = "cpu"
    precision: str | None = None
    batch: int = 1
    prompt_length: int = 128
    cache_length: int = 512
    use_fp32_acc: bool = True
    pack_weights: bool = True
    decode_kernel: str = "exact"
    quant: str = "f16"


def validate_target(target: str) -> None:
    if target not in TARGETS:
        raise CompileError([error("E170", f"unknown lowering target `{target}`", None,
                                  did_you_mean(target, TARGETS) or f"targets are {', '.join(TARGETS)}")])


def preflight(options: LowerOptions) -> None:
    """What can be refused before any weight is read: the target, and tensorrt's runtime."""
    validate_target(options.target)
    if options.target == "tensorrt":
        from cfmlang.compiler.lower.tensorrt import require_runtime

        require_runtime(options.device)
    if options.target == "gguf":
        from cfmlang.compiler.lower.gguf_file import require_quant

        require_quant(options.quant)
    require_decode_kernel(options)


def require_decode_kernel(options: LowerOptions) -> None:
    """E300: an unknown `decode_kernel`, or torch's int4 CPU kernels asked for another device."""
    kernel = options.decode_kernel
    if kernel not in DECODE_KERNELS:
        raise CompileError([error("E300", f"unknown decode kernel `{kernel}`", None,
                                  did_you_mean(kernel, DECODE_KERNELS) or f"kernels are {', '.join(DECODE_KERNELS)}")])
    if kernel != "exact" and options.target == "inductor" and options.device != "cpu":
        raise CompileError([error("E300", f"`--decode-kernel {kernel}` runs torch's int4 CPU kernels; "
                                  f"this program is lowered for {options.device}", None,
                                  "use `--decode-kernel exact` or `--device cpu`")])


def lower_artifact(directory: Path, manifest: dict, options: LowerOptions,
                   log: Callable[[str], None]) -> dict | None:
    """Lower the model written in `directory` to `options.target`; None for eager."""
    validate_target(options.target)
    if options.target == "eager":
        return None
    preflight(options)
    (directory / LOWERED_DIR).mkdir()
    entry = _lowering(options.target)(directory, manifest, options, log)
    return {"target": options.target, "device": options.device, **entry}


def _lowering(target: str) -> Callable[[Path, dict, LowerOptions, Callable[[str], None]], dict]:
    """The function that writes `target` into an artifact directory."""
    if target == "gguf":
        from cfmlang.compiler.lower import gguf_file

        return gguf_file.lower
    from cfmlang.compiler.lower import export, inductor, tensorrt
    from cfmlang.compiler.lower.decoder import load_for_lowering

    program = {"export": export.lower, "inductor": inductor.lower, "tensorrt": tensorrt.lower}[target]

    def lower(directory: Path, manifest: dict, options: LowerOptions, log) -> dict:
        model = load_for_lowering(directory, manifest, options)
        entry = program(model, directory / LOWERED_DIR, options, log)
        if target in NATIVE_TARGETS:
            for file in entry["files"].values():
                record_trusted(directory / file)
        return entry
    return lower
