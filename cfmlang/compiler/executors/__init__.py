"""Executors: where a node's tensors are computed while its output is written.

`local` (the default) computes them in this process, as the provider is pulled by the
writer. `ray` sends the tensors of a node whose operation is `distributable` to the
workers of a Ray cluster (`ray_cluster.py`); the writer here still writes every shard,
in the same order, so the artifact is byte-identical to a local compile.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cfmlang.cluster import check_executor
from cfmlang.compiler.ir import CheckedProgram
from cfmlang.io.provider import Provider
from cfmlang.ops.base import Sizes


@dataclass(frozen=True)
class NodeJob:
    """What a worker needs to compute one node's tensors on its own: the checked program,
    the node, the names it depends on in execution order (ending with the node), the
    cache folder (converted GGUF files), and the nodes already stored as cache entries
    (name, folder, the entry's record), restored by their operation instead of being
    computed again. Every path must be one that every node of the cluster sees."""

    program: CheckedProgram
    name: str
    order: tuple[str, ...]
    cache_dir: Path
    stored: tuple[tuple[str, str, dict], ...]


class Executor(Protocol):
    def provider(self, job: NodeJob, provider: Provider, sizes: Sizes, log) -> Provider:
        """The provider the writer pulls the node's tensors from (`log`: progress lines)."""


class LocalExecutor:
    """Everything in this process: the node's own provider, unchanged."""

    def provider(self, job: NodeJob, provider: Provider, sizes: Sizes, log) -> Provider:
        return provider


LOCAL = LocalExecutor()


def executor_named(name: str, address: str | None = None) -> Executor:
    """The executor `name` (E243 for an address without `ray`, E240 when Ray is missing)."""
    check_executor(name, address)
    if name == "local":
        return LOCAL
    from cfmlang.compiler.executors.ray_cluster import RayExecutor
    return RayExecutor(address)
