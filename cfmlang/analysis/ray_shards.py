"""The analysis's passes over the probe prompts as tasks on a Ray cluster.

The driver sends the model (as loaded in float32) into the cluster's object store once per
analysis; every worker process takes it from there once and keeps it for the passes that
follow. A pass cuts its batches into shards of consecutive batches (SHARDS_PER_CPU per CPU
of the cluster, spread over the nodes) and each task returns its batches' results, which
the driver takes in order. A task lost with its node is run again by Ray.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from cfmlang.cluster import connect, fetched

SHARDS_PER_CPU = 2      # shards per pass for each CPU of the cluster (fewer when there are fewer batches)
RETRIES = 4             # runs of a task lost with its node
WORKER_HINT = ("every node of the cluster needs cfmlang with the same Python packages (torch, transformers) "
               "and enough memory for one copy of the model per worker")

_MODELS: dict[str, object] = {}


def run_shard(token: str, sent: list, work, items: list):
    """A task: `work(model, item)` for the items of one shard, with the model of analysis
    `token` (taken from the object store once per worker process); and the worker's node."""
    import ray

    if token not in _MODELS:
        _MODELS.clear()
        _MODELS[token] = ray.get(sent[0])
    model = _MODELS[token]
    return [work(model, item) for item in items], ray.get_runtime_context().get_node_id()


def cut(items: list, parts: int) -> list[list]:
    """`items` in `parts` runs of consecutive items whose lengths differ by one at most."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        runs.append(items[start:end])
        start = end
    return runs


@dataclass
class RayShards:
    """Passes run on the Ray cluster at `address` (None: the one this process is
    connected to, else a new local one)."""

    address: str | None
    tasks: int = 0
    nodes: set = field(default_factory=set)

    def __post_init__(self):
        self._remote = None
        self._cpus = 1
        self._model = None       # the model sent, with its object reference and token
        self._sent: list = []
        self._token = ""

    def map(self, model, work, items, tick):
        items = list(items)
        if not items:
            return []
        self._send(model)
        futures = [self._remote.remote(self._token, self._sent, work, shard)
                   for shard in cut(items, SHARDS_PER_CPU * self._cpus)]
        results = []
        for future in futures:
            part, node = self._result(future)
            self.tasks += 1
            self.nodes.add(node)
            for result in part:
                results.append(result)
                tick()
        return results

    def finish(self, log) -> None:
        if self.tasks:
            log(f"prompt shards: {self.tasks} task(s) ran on {len(self.nodes)} node(s) of the Ray cluster")
        self._model, self._sent = None, []

    def _send(self, model) -> None:
        """Connect (once) and put `model` into the object store unless it is there already."""
        import ray

        if self._remote is None:
            self._cpus = connect(self.address)
            self._remote = ray.remote(max_retries=RETRIES, scheduling_strategy="SPREAD")(run_shard)
        if not self._sent or self._model is not model:
            # a list, so that Ray hands the reference to the task instead of the model
            self._model, self._sent, self._token = model, [ray.put(model)], uuid.uuid4().hex

    def _result(self, future):
        return fetched(future, "a prompt shard", "E244", f"it was retried {RETRIES} times if lost; {WORKER_HINT}")
