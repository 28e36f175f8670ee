"""Where `cfmc analyze` runs its forward passes over the probe prompts.

Every measurement of the analysis is a pass over the probe prompts in the batches of
`activations.batches` (prompts grouped by length): a function of the model and one batch,
whose results the measurement puts together in the batches' order. `LOCAL` runs the
batches here, one after the other; the Ray executor (`ray_shards.py`) cuts them into
shards of consecutive batches and runs each shard as a task on a Ray cluster. A batch is
the same either way, so every result comes from the same computation on the same inputs,
and the analysis assembled from the shards is the local one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from cfmlang.cluster import check_executor

Item = TypeVar("Item")
Result = TypeVar("Result")


class Shards(Protocol):
    def map(self, model, work: Callable[[Any, Item], Result], items: Sequence[Item],
            tick: Callable[[], None]) -> list[Result]:
        """`work(model, item)` for every item, in order; `tick()` after each."""

    def finish(self, log: Callable[[str], None]) -> None:
        """The analysis is done: release what was sent, and say where the work ran."""


class LocalShards:
    """Every batch in this process."""

    def map(self, model, work, items, tick):
        results = []
        for item in items:
            results.append(work(model, item))
            tick()
        return results

    def finish(self, log) -> None:
        pass


LOCAL = LocalShards()


def shards_named(name: str, address: str | None = None) -> Shards:
    """The executor `name` for the analysis (E243, E240 as for compiles)."""
    check_executor(name, address)
    if name == "local":
        return LOCAL
    from cfmlang.analysis.ray_shards import RayShards
    return RayShards(address)
