"""The `tensorrt` target: Torch-TensorRT (dynamo) on static-shape exported programs.

Two programs with static shapes, both with the functional cache (a TensorRT engine
maps inputs to outputs and mutates nothing): `prefill` (batch x prompt_length tokens,
prompts right-padded: causal masking keeps the padding out of every real position) and
`decode` (batch x 1). The graph is cast to the target precision before export (float16
by default), and `use_fp32_acc` keeps float16 matmuls accumulating in float32.
`torch_tensorrt` is an optional extra, imported only here; everything up to its compile
call (export, static shapes, no data-dependent ops, the converter report) runs on CPU.
Routed FFNs are traced dense-masked in prefill and as a gather of the chosen experts in decode.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from cfmlang.compiler.lower.decoder import CachedDecoder
from cfmlang.compiler.lower.export import example_inputs, formulation, run_export
from cfmlang.compiler.lower.passes import (require_no_data_dependent_ops, require_static_shapes,
                                           tensorrt_unconverted)
from cfmlang.diagnostics import CompileError, error

PROGRAMS = {"prefill": "tensorrt_prefill.ep", "decode": "tensorrt_decode.ep"}
INSTEAD = "on a machine without it, use `--target inductor` (CPU, compiled) or `--target export`"


def require_runtime(device: str) -> None:
    """torch_tensorrt importable and a CUDA device requested and present, or E172."""
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        raise CompileError([error("E172", "target `tensorrt` needs the `torch_tensorrt` package, "
                                  "which is not installed", None,
                                  "install the optional extra on a CUDA machine: "
                                  "pip install 'cfmlang[tensorrt]'", INSTEAD)]) from None
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        raise CompileError([error("E172", "target `tensorrt` needs a CUDA GPU"
                                  + ("" if torch.cuda.is_available() else " and none is available")
                                  + f" (device `{device}`)", None,
                                  "pass `--device cuda` on a machine with an NVIDIA GPU", INSTEAD)])


def check_shapes(config, options) -> None:
    limit = config.max_position_embeddings
    if not (options.batch >= 1 and 1 <= options.prompt_length < options.cache_length <= limit):
        raise CompileError([error("E176", f"tensorrt static shapes need batch >= 1 and "
                                  f"1 <= prompt length < cache length <= {limit}; got batch "
                                  f"{options.batch}, prompt {options.prompt_length}, cache {options.cache_length}",
                                  None, "adjust --batch, --prompt-length or --cache-length")])


def static_programs(model: nn.Module, options) -> dict[str, tuple[torch.export.ExportedProgram, tuple]]:
    """The prefill and decode programs with their example inputs, verified: static shapes,
    no data-dependent operators."""
    check_shapes(model.config, options)
    parameter = next(model.parameters())
    programs = {}
    for name, length in (("prefill", options.prompt_length), ("decode", 1)):
        args = example_inputs(model.config, options.batch, length, options.cache_length,
                              parameter.dtype, parameter.device)
        args = (args[0], args[1] + (0 if name == "prefill" else options.prompt_length), *args[2:])
        with formulation(model, "masked" if name == "prefill" else "gather"):
            program = run_export(CachedDecoder(model, functional_cache=True).eval(), args, None)
        require_static_shapes(program, f"tensorrt {name}")
        require_no_data_dependent_ops(program, f"tensorrt {name}")
        programs[name] = (program, args)
    return programs


def compile_settings(compile_fn, options, dtype: torch.dtype) -> dict:
    """Keyword arguments for `torch_tensorrt.dynamo.compile`, for the installed version:
    newer releases are strongly typed (the graph's casts decide precision); older ones
    take `enabled_precisions` and need `use_explicit_typing` for `use_fp32_acc`."""
    parameters = inspect.signature(compile_fn).parameters
    fp32_acc = options.use_fp32_acc and dtype == torch.float16
    settings = {"device": torch.device(options.device), "use_fp32_acc": fp32_acc,
                "min_block_size": 1, "truncate_double": True}
    if "use_explicit_typing" in parameters:
        settings["use_explicit_typing"] = True
    elif "enabled_precisions" in parameters:
        settings["enabled_precisions"] = {dtype}
    return settings


def lower(model: nn.Module, out_dir: Path, options, log) -> dict:
    import torch_tensorrt

    programs = static_programs(model, options)
    unconverted = sorted({op for program, _ in programs.values() for op in tensorrt_unconverted(program) or ()})
    if unconverted:
        log(f"warning[W071]: torch_tensorrt has no converter for {', '.join(unconverted)}; "
            "these run in PyTorch between TensorRT engines")
    dtype = next(model.parameters()).dtype
    settings = compile_settings(torch_tensorrt.dynamo.compile, options, dtype)
    for name, (program, args) in programs.items():
        log(f"building the TensorRT engine for {name}")
        engine = torch_tensorrt.dynamo.compile(program, arg_inputs=args, **settings)
        torch_tensorrt.save(engine, str(out_dir / PROGRAMS[name]), output_format="exported_program",
                            arg_inputs=args)
    return {"files": {name: f"lowered/{file}" for name, file in PROGRAMS.items()}, "cache": "functional",
            "dtype": str(dtype).removeprefix("torch."), "use_fp32_acc": settings["use_fp32_acc"],
            "static": {"batch": options.batch, "prompt_length": options.prompt_length,
                       "cache_length": options.cache_length},
            "unconverted_ops": unconverted}
