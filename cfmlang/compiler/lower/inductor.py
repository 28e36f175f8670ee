"""The `inductor` target: an AOTInductor package compiled from the exported program.

The weights are frozen into the package (`freezing`: constant folding and prepacked
weights on CPU). AOTInductor does not write back mutated inputs, so this program uses the
functional cache: it returns the updated caches, which the caller passes to the next step.
Saved as `lowered/model_inductor.pt2` (routed models: `prefill_inductor.pt2` and
`decode_inductor.pt2`, see `export`), loaded with `torch._inductor.aoti_load_package`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cfmlang.compiler.lower.export import export_programs, program_facts
from cfmlang.compiler.lower.passes import require_no_data_dependent_ops

PACKAGE = "model_inductor.pt2"


def lower(model: nn.Module, out_dir: Path, options, log) -> dict:
    files = {}
    for name, program in export_programs(model, functional_cache=True).items():
        require_no_data_dependent_ops(program, f"inductor ({name})")
        file = PACKAGE if name == "program" else f"{name}_inductor.pt2"
        log(f"compiling {file} with AOTInductor (weight freezing); minutes for a real model")
        torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / file),
                                                 inductor_configs={"freezing": True})
        files[name] = f"lowered/{file}"
    return {"files": files, "cache": "functional", **program_facts(model)}
