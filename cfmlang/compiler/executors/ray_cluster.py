"""The Ray executor: a node's tensors computed by tasks on a Ray cluster.

The driver cuts the node's tensors, in the writer's order, into batches; each task wires
the node's providers from the program (reading inputs from storage every node sees, at
the same paths), computes its batch in the row blocks the writer asks for, and returns
them. The driver keeps a bounded window of tasks in flight and hands the blocks to the
writer in order, so memory here stays near a window of batches and the shards come out
byte-identical to a local compile. A task lost with its node is run again by Ray
(`max_retries`, and lineage reconstruction of results held on a removed node).
"""
from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from cfmlang.artifact.write import nbytes, row_chunks
from cfmlang.cluster import connect
from cfmlang.compiler.executors import NodeJob
from cfmlang.compiler.execute import make_provider
from cfmlang.compiler.ir import TensorSpec
from cfmlang.diagnostics import CompileError, error
from cfmlang.io.provider import Provider
from cfmlang.io.weights import WeightError
from cfmlang.ops.base import BuildContext, Sizes, operation_of

BATCH_BYTES = 64 * 1024**2     # tensors of at most this many bytes go to one task (one tensor at least)
TASKS_PER_CPU = 4              # smaller batches for small nodes, so that every worker gets some
RETRIES = 4                    # runs of a task lost with its node
WORKER_HINT = ("every node of the cluster needs cfmlang (with the same Python packages) and the input "
               "files and the cache folder at the same paths (shared storage)")


@dataclass(frozen=True)
class Batch:
    """The tensors of one task: their names, and the row blocks of each, as written."""

    blocks: tuple[tuple[str, tuple[int, int] | None], ...]


def batch_limit(specs: list[TensorSpec], cpus: int) -> int:
    """Bytes per batch: BATCH_BYTES, or less when that would give the cluster's CPUs fewer
    than TASKS_PER_CPU tasks each."""
    total = sum(nbytes(s) for s in specs)
    return max(1, min(BATCH_BYTES, total // (TASKS_PER_CPU * max(cpus, 1))))


def batches(specs: list[TensorSpec], sizes: Sizes, limit: int) -> list[Batch]:
    """The node's tensors in order, cut into batches of at most `limit` bytes (a larger
    tensor is a batch of its own), each with the row blocks the writer will ask for."""
    cut: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if cut[-1] and used + nbytes(spec) > limit:
            cut.append([])
            used = 0
        cut[-1].append(spec)
        used += nbytes(spec)
    return [Batch(tuple((s.name, rows) for s in group for rows in row_chunks(s, sizes.chunk_bytes)))
            for group in cut if group]


_WIRED: dict[str, Provider] = {}


def wired_provider(token: str, job: NodeJob) -> Provider:
    """The node's provider in this worker process, wired once per job from its program."""
    if token not in _WIRED:
        _WIRED.clear()
        context = BuildContext(job.program, Path(job.cache_dir), lambda message: None,
                               lambda name, step, steps, loss: None)
        stored = {name: (Path(folder), record) for name, folder, record in job.stored}
        providers: dict[str, Provider] = {}
        for name in job.order:
            node = job.program.node(name)
            providers[name] = (operation_of(node).restore(node, *stored[name], providers) if name in stored
                               else make_provider(context, node, providers))
        _WIRED[token] = providers[job.name]
    return _WIRED[token]


def compute_batch(token: str, job: NodeJob, batch: Batch):
    """A task: the row blocks of `batch`, computed on this worker; and the worker's node."""
    import ray

    provider = wired_provider(token, job)
    blocks = [(name, rows, provider.get(name, rows).clone()) for name, rows in batch.blocks]
    return blocks, ray.get_runtime_context().get_node_id()


@dataclass
class RayExecutor:
    """Nodes of `distributable` operations computed on the Ray cluster at `address`
    (None: the one this process is connected to, else a new local one)."""

    address: str | None
    window: int = 4
    remote: object = None

    def provider(self, job: NodeJob, provider: Provider, sizes: Sizes, log) -> Provider:
        if not operation_of(job.program.node(job.name)).distributable:
            return provider
        import ray

        cpus = self.connect()
        plan = batches(provider.specs, sizes, batch_limit(provider.specs, cpus))
        return RemoteProvider(provider, job.name, self.remote, ray.put(job), uuid.uuid4().hex, plan,
                              max(self.window, 2 * cpus), log)

    def connect(self) -> int:
        """Connect (once) and return the cluster's CPU count."""
        import ray

        cpus = connect(self.address)
        if self.remote is None:
            self.remote = ray.remote(max_retries=RETRIES, scheduling_strategy="SPREAD")(compute_batch)
        return cpus


@dataclass
class RemoteProvider:
    """Serves the writer the node's row blocks as the cluster computes them, in order;
    everything else (specs, config, support files, dtype) is the local provider's."""

    local: Provider
    name: str
    remote: object
    job: object
    token: str
    plan: list[Batch]
    window: int
    log: object
    nodes: set = field(default_factory=set)

    def __post_init__(self):
        self._next = 0
        self._flight: deque = deque()
        self._ready: dict = {}

    def __getattr__(self, attribute):
        return getattr(self.__dict__["local"], attribute)

    def get(self, name: str, rows=None):
        block = self._ready.pop((name, rows), None)
        while block is None:
            self._ready = self._fetch_next()
            if not self._ready:
                raise WeightError(f"tensor `{name}` rows {rows} were not computed by the cluster")
            block = self._ready.pop((name, rows), None)
        if hasattr(self.local, "stats"):
            self.local.stats.count(name)
        return block

    def _fetch_next(self) -> dict:
        import ray

        while self._next < len(self.plan) and len(self._flight) < self.window:
            self._flight.append(self.remote.remote(self.token, self.job, self.plan[self._next]))
            self._next += 1
        if not self._flight:
            return {}
        try:
            blocks, node = ray.get(self._flight.popleft())
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, WeightError):
                raise cause from None
            raise CompileError([error("E242", f"a task on the Ray cluster failed: {type(cause).__name__}: {cause}",
                                      None, WORKER_HINT)]) from None
        except ray.exceptions.RayError as exc:
            raise CompileError([error("E242", f"the Ray cluster lost a task: {type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else ''}", None,
                                      f"it was retried {RETRIES} times; {WORKER_HINT}")]) from None
        self.nodes.add(node)
        if self._next == len(self.plan) and not self._flight:
            self.log(f"`{self.name}`: {len(self.plan)} task(s) ran on {len(self.nodes)} node(s) of the Ray cluster")
        return {(name, rows): block for name, rows, block in blocks}
