"""Passes over an exported program before it is saved or handed to a backend.

- `data_dependent_ops`: the program must have no shape that depends on tensor values
  (`nonzero`, `masked_select`, `unique`, `.item()`...): such shapes break static-shape
  backends and cache-friendly compilation. Detected two ways: known data-dependent
  operators, and any node whose output shape holds an unbacked symbol.
- `static_shapes`: every input of a tensorrt program has concrete sizes.
- `tensorrt_unconverted`: the operators the installed torch_tensorrt has no converter for.
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from cfmlang.diagnostics import CompileError, error

DATA_DEPENDENT = {"nonzero", "nonzero_static", "masked_select", "unique", "unique_consecutive",
                  "_unique2", "unique_dim", "argwhere", "_local_scalar_dense", "repeat_interleave",
                  "masked_scatter", "item"}


def op_name(node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def data_dependent_ops(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the operators whose output shape (or value as a size) depends on data."""
    found = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        value = node.meta.get("val")
        unbacked = value is not None and bool(free_unbacked_symbols(value))
        if op_name(node) in DATA_DEPENDENT or unbacked:
            found.append(op_name(node))
    return sorted(set(found))


def require_no_data_dependent_ops(program, what: str) -> None:
    found = data_dependent_ops(program)
    if found:
        raise CompileError([error(
            "E171", f"{what}: the exported graph has data-dependent shapes (from {', '.join(found)})", None,
            "lowered programs need shapes that follow from input shapes only; routed layers "
            "must use their exportable formulation (dense-masked or gather with a static top-k)",
            "or compile with `--target eager`")])


def dynamic_inputs(program: torch.export.ExportedProgram) -> list[str]:
    """Names of user inputs with a symbolic size."""
    names = []
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and any(not isinstance(s, int) for s in value.shape):
            names.append(node.name)
    return names


def require_static_shapes(program, what: str) -> None:
    dynamic = dynamic_inputs(program)
    if dynamic:
        raise CompileError([error("E171", f"{what}: inputs with dynamic sizes: {', '.join(dynamic)}",
                                  None, "tensorrt programs are exported with static shapes")])


def tensorrt_unconverted(program: torch.export.ExportedProgram) -> list[str] | None:
    """Operators of the program (after torch_tensorrt's own decompositions) that the
    installed torch_tensorrt cannot convert; None when torch_tensorrt is not installed."""
    try:
        from torch_tensorrt.dynamo.conversion._ConverterRegistry import DYNAMO_CONVERTERS
        from torch_tensorrt.dynamo.lowering import get_decompositions
    except ImportError:
        return None
    lowered = program.run_decompositions(get_decompositions(False))
    missing = {str(node.target) for node in lowered.graph.nodes
               if node.op == "call_function" and node.target.__module__ != "_operator"
               and node not in DYNAMO_CONVERTERS}
    return sorted(missing)
