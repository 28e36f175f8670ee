"""Tensor providers: what every node of the graph becomes while executing. A provider
serves its output's tensors one at a time (or a block of rows of one), lazily, so nothing
is held whole unless an operation must."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from cfmlang.compiler.ir import TensorSpec
from cfmlang.io.sources import weight_files
from cfmlang.io.weights import NodeStats, Rows, SafetensorsReader


class Provider(Protocol):
    specs: list[TensorSpec]
    support_dir: Path       # tokenizer and generation config of the output
    config: dict            # its config.json

    def get(self, name: str, rows: Rows = None) -> torch.Tensor: ...


@dataclass
class SourceProvider:
    """The tensors of a source read as they are stored."""

    reader: Any
    support_dir: Path
    stats: NodeStats = field(default_factory=NodeStats)

    def __post_init__(self):
        self.config = json.loads((self.support_dir / "config.json").read_text())

    @property
    def specs(self) -> list[TensorSpec]:
        return self.reader.specs

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        self.stats.count(name)
        return self.reader.get(name, rows)


def stored_provider(folder: Path) -> SourceProvider:
    """A provider serving the tensors of an artifact-like folder (a cache entry)."""
    return SourceProvider(SafetensorsReader(weight_files(folder, False)), folder)
