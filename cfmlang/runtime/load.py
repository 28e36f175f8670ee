"""`cfmlang.load`: an artifact as a torch module, its lowered program when it has one."""
from __future__ import annotations

from pathlib import Path

from cfmlang.artifact.load import load_eager
from cfmlang.artifact.read import lowered_entry, read_manifest
from cfmlang.compiler.lower import FILE_TARGETS, validate_target
from cfmlang.diagnostics import CompileError, error
from cfmlang.runtime.generation import LoweredModel


def load(directory, target: str | None = None, device: str | None = None, trust_code: bool = False,
         **kwargs):
    """The compiled model as a torch module: the lowered program when the artifact was
    compiled with a lowering target (a `LoweredModel` with `generate`), else the
    transformers model. `target="eager"` always gives the transformers model.
    Nothing in the artifact runs as code: pickled payloads in programs are refused, and
    native (inductor, tensorrt) programs load only when this machine built them or
    `trust_code=True`."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    lowered = lowered_entry(directory, manifest)
    if target is not None:
        validate_target(target)
    if target in FILE_TARGETS:
        raise CompileError([error("E254", f"`{target}` is a model file for other runtimes, not a program cfmlang "
                                  "runs", None, f"run {directory}/lowered/model.{target} with llama.cpp or Ollama, "
                                  "or load the artifact with target=\"eager\"")])
    if target == "eager" or (target is None and lowered is None):
        model = load_eager(directory, manifest, **kwargs)
        return model.to(device) if device else model
    if lowered is None or (target is not None and lowered.target != target):
        raise CompileError([error("E175", f"{directory} holds no `{target}` program (lowered: "
                                  f"{lowered.target if lowered else 'none'})", None,
                                  f"compile it with `cfmc compile FILE -o DIR --target {target}`, "
                                  "or load it with target=\"eager\"")])
    return LoweredModel(directory, lowered.raw, device, trust_code=trust_code)
