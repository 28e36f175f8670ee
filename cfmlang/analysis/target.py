"""The model to analyse: `FILE.brick` (its output), `FILE.brick:NODE`, or a model
directory (a cfmlang artifact or any transformers checkpoint), loaded in float32."""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cfmlang.diagnostics import CompileError, error


@dataclass(frozen=True)
class ModelSpec:
    brick: Path | None      # the .brick file, or None for a directory
    node: str | None        # the node to build (None: the file's output)
    directory: Path | None

    @property
    def title(self) -> str:
        if self.brick is None:
            return self.directory.resolve().name
        return f"{self.brick.name}:{self.node}" if self.node else self.brick.name


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    title: str


def parse_spec(text: str) -> ModelSpec:
    path = Path(text)
    if path.is_dir():
        return ModelSpec(None, None, path)
    file, colon, node = text.rpartition(":")
    if colon and file.endswith(".brick") and node.isidentifier():
        return ModelSpec(_brick_file(Path(file)), node, None)
    if text.endswith(".brick"):
        return ModelSpec(_brick_file(path), None, None)
    raise CompileError([error("E160", f"`{text}` is neither a .brick file nor a model directory", None,
                              "pass FILE.brick (its output), FILE.brick:NODE, or a directory "
                              "written by `cfmc compile` or `save_pretrained`")])


def _brick_file(path: Path) -> Path:
    if not path.is_file():
        raise CompileError([error("E160", f"cannot read `{path}`: no such file", None, "check the path")])
    return path


@contextlib.contextmanager
def open_model(spec: ModelSpec, cache_dir: Path | None = None, log=lambda msg: None, executor: str = "local",
               address: str | None = None) -> Iterator[LoadedModel]:
    """The model and tokenizer of `spec`; a .brick node is compiled (with `executor`)
    into a temporary artifact that lives as long as the block."""
    if spec.directory is not None:
        yield load_directory(spec.directory, spec.title)
        return
    import cfmlang

    with tempfile.TemporaryDirectory(prefix="cfm-analyze-") as scratch:
        log(f"compiling {spec.title} ...")
        cfmlang.compile(spec.brick, Path(scratch) / "model", cache_dir=cache_dir, log=log, node=spec.node,
                        executor=executor, address=address)
        yield load_directory(Path(scratch) / "model", spec.title)


def load_directory(directory: Path, title: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import cfmlang

    hf_logging.disable_progress_bar()
    if (directory / "cfm.json").is_file():
        model = cfmlang.load(directory, dtype=torch.float32)
    elif (directory / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    else:
        raise CompileError([error("E160", f"{directory} holds no model (no cfm.json or config.json)", None,
                                  "pass a directory written by `cfmc compile` or `save_pretrained`")])
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CompileError([error("E161", f"{directory} has no usable tokenizer: {exc}", None,
                                  "save the tokenizer next to the weights (tokenizer.save_pretrained)")]) from None
    return LoadedModel(model.float().eval(), tokenizer, title)
