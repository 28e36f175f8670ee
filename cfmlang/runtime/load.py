"""`cfmlang.load`: an artifact as a torch module, its lowered program when it has one."""
from __future__ import annotations

from pathlib import Path

from cfmlang.artifact.load import load_eager
from cfmlang.compiler.lower import FILE_TARGETS, validate_target
from cfmlang.diagnostics import CompileError, error
from cfmlang.runtime.generation import LoweredModel, lowered_entry


def load(directory, target: str | None = None, device: str | None = None, **kwargs):
    """The compiled model as a torch module: the lowered program when the artifact was
    compiled with a lowering target (a `LoweredModel` with `generate`), else the
    transformers model. `target="eager"` always gives the transformers model."""
    directory = Path(directory)
    if not (directory / "cfm.json").is_file():
        raise CompileError([error("E090", f"{directory} is not a cfmlang artifact (no cfm.json)",
                                  None, "compile one with `cfmc compile FILE -o DIR`")])
    lowered = lowered_entry(directory)
    if target is not None:
        validate_target(target)
    if target in FILE_TARGETS:
        raise CompileError([error("E254", f"`{target}` is a model file for other runtimes, not a program cfmlang "
                                  "runs", None, f"run {directory}/lowered/model.{target} with llama.cpp or Ollama, "
                                  "or load the artifact with target=\"eager\"")])
    if target == "eager" or (target is None and lowered is None):
        model = load_eager(directory, **kwargs)
        return model.to(device) if device else model
    if lowered is None or (target is not None and lowered["target"] != target):
        raise CompileError([error("E175", f"{directory} holds no `{target}` program (lowered: "
                                  f"{lowered['target'] if lowered else 'none'})", None,
                                  f"compile it with `cfmc compile FILE -o DIR --target {target}`, "
                                  "or load it with target=\"eager\"")])
    return LoweredModel(directory, lowered, device)
