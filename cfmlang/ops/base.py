"""The operation protocol: everything the generic pipeline asks of an operation.

One `Operation` object per operation (model/attach, merge, lora, grow, update, experts and
their top-k routes, routes over lora bricks) is registered with `register_operation`. The
checker asks which operation claims a statement and has it checked into an IR node; the
graph, planner, executor, cache and manifest then ask the node's operation for its label,
estimates, provider, writer and manifest entry. None of those stages names an operation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from cfmlang.artifact.write import copy_support_files, nbytes, write_sharded
from cfmlang.compiler.ir import CheckedProgram, IRNode, TensorSpec
from cfmlang.frontend import ast
from cfmlang.io.provider import Provider, stored_provider

COPY_BYTES_PER_SECOND = 740e6
"""Bytes of input copied, or combined tensor by tensor, per second on the 2-core reference
machine (`passthrough`'s rate in ops/merge): attaching, growing and combining adapters."""
MODEL_FLOPS_PER_SECOND = 9.1e9
"""Float32 FLOPs per second of a causal LM's forward and backward passes on the 2-core
reference machine: benchmarks/plan_rates.py --kinds measures it as a ratio to `linear`'s
merge rate and scales it to linear's rate there."""

OnTrainStep = Callable[[str, int, int, float], None]
"""`on_train_step(brick, step, steps, loss)`: follows bricks that train."""
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Output:
    """What writing a node's output produced: its files, tensor count and bytes, and
    manifest fields of its kind: top-level ones (an adapter's ranks, a routed model's
    routing ...), and under `"node"` fields of the node's own entry in `nodes` (an edit's
    report, a fine-tune's losses)."""

    files: list[str]
    tensors: int
    bytes: int
    extras: dict


@dataclass(frozen=True)
class Sizes:
    """How outputs are written: shards of at most `shard_bytes`, tensors computed and
    written `chunk_bytes` of rows at a time."""

    shard_bytes: int
    chunk_bytes: int


@dataclass(frozen=True)
class SourceCost:
    """What reading a source costs a compile: bytes read and written (a conversion), peak
    memory, seconds, and a note for the plan (`converted once`)."""

    bytes_read: int
    bytes_written: int
    peak_bytes: int
    seconds: float
    note: str


@dataclass(frozen=True)
class BuildContext:
    """What building a provider may use beyond the providers of its inputs."""

    program: CheckedProgram
    cache_dir: Path
    log: Callable[[str], None]
    on_train_step: OnTrainStep

    def seed(self, node) -> int:
        return node_seed(self.program, node)


class Operation:
    """An operation of the language. Subclasses set `name`, `nodes` (the IR classes they
    produce) and override what differs from the defaults below."""

    name: ClassVar[str]
    nodes: ClassVar[tuple[type, ...]] = ()
    fallback: ClassVar[bool] = False
    """A fallback operation handles a statement only when no other operation claims it
    (plain `merge` yields to merges over lora bricks)."""
    distributable: ClassVar[bool] = False
    """Whether the node's provider computes each tensor on its own from its inputs' tensors
    (so an executor may compute them elsewhere, in batches, from the same program)."""

    # ---- checking ----------------------------------------------------------------------
    def claims(self, checker, decl: ast.Decl, body: ast.MapValue) -> bool:
        """Whether this operation checks the statement `decl`."""
        raise NotImplementedError

    def references(self, body: ast.MapValue) -> list[str]:
        """Names of other declarations the statement depends on."""
        return []

    def check(self, checker, declared, body: ast.MapValue) -> IRNode | None:
        """The statement checked into its IR node (None when it has errors, reported on
        `checker.problems`)."""
        raise NotImplementedError

    # ---- graph and plan ----------------------------------------------------------------
    def attributes(self, node) -> dict:
        """The node's attributes in the graph (`op` first, then what identifies it)."""
        raise NotImplementedError

    def label(self, name: str, attributes: dict) -> str:
        """A two-line label for graph drawings."""
        return f"{name}\\n{attributes['op']} {attributes.get('method', '')}".rstrip()

    def output_specs(self, program: CheckedProgram, node) -> tuple[TensorSpec, ...]:
        """The tensors the node produces, as far as the checker knows them."""
        return node.arch.tensors

    def working_set(self, program: CheckedProgram, node, chunk_bytes: int) -> int:
        """Estimated bytes the node holds while it runs. Default: operations that run the
        model hold their inputs whole in float32, four times over (weights, gradients,
        optimiser moments)."""
        return 4 * sum(s.numel * 4 for d in node.deps for s in input_specs(program, d))

    def rate(self, node) -> float | None:
        """Bytes of input processed per second on the reference machine (None: unknown)."""
        return None

    def seconds(self, program: CheckedProgram, node, bytes_read: int) -> float | None:
        """Estimated seconds the node runs on the reference machine. Default: `bytes_read`
        (its inputs' outputs, whole) over `rate`; operations that run a model count its
        FLOPs instead (`model_seconds`)."""
        rate = self.rate(node)
        return bytes_read / rate if rate else None

    def source_cost(self, node, cache) -> SourceCost | None:
        """For a node that is a source (read by its consumers, never run nor cached), what
        reading it costs; None for every other node."""
        return None

    # ---- building ----------------------------------------------------------------------
    def provider(self, context: BuildContext, node, providers: dict[str, Provider]) -> Provider:
        """The lazy tensor provider of the node, reading from its inputs' providers."""
        raise NotImplementedError

    def write(self, node, provider: Provider, folder: Path, sizes: Sizes, progress: Progress | None,
              log) -> Output:
        """Write the node's output into `folder`. Default: the model's safetensors shards
        and support files."""
        return write_model(provider, folder, sizes, progress)

    # ---- caching ------------------------------------------------------------------------
    def restorable(self, node) -> bool:
        """Whether the node's cache entry (what `write` put there) can stand in for running
        it when other nodes read it. Default: models."""
        return getattr(node, "node_type", None) == "model"

    def stored_bytes(self, program: CheckedProgram, node) -> int:
        """Estimated bytes of the node's cache entry. Default: its output tensors."""
        return sum(s.nbytes for s in self.output_specs(program, node))

    def restore(self, node, folder: Path, record: dict, providers: dict[str, Provider]) -> Provider:
        """The node's provider read back from its cache entry `folder` (`record`: what the
        entry recorded). Default: the stored model's tensors."""
        return stored_provider(folder)

    def restore_reads_inputs(self, node) -> bool:
        """Whether `restore` reads the providers of the node's inputs (they are then
        opened even when the node is cached)."""
        return False

    def refuse_output(self, node):
        """A diagnostic when the node cannot be a compile's output (None: it can)."""
        return None

    def verify(self, node, provider: Provider, log) -> dict | None:
        """A check of a node that is not written (streamed through, or read by a cached
        consumer), recorded in the manifest; None when the node asks for none."""
        return None

    def manifest(self, program: CheckedProgram, node, verified: dict | None) -> dict:
        """The node's entry in cfm.json (`op` first). `verified`: its check, if any."""
        raise NotImplementedError


OPERATIONS: list[Operation] = []


def register_operation(operation: Operation) -> Operation:
    """Add an operation; its node classes must not belong to another one."""
    owned = {cls for op in OPERATIONS for cls in op.nodes}
    if owned & set(operation.nodes):
        raise ValueError(f"operation {operation.name!r} claims node classes already registered")
    OPERATIONS.append(operation)
    return operation


def operation_of(node) -> Operation:
    """The operation that produced an IR node."""
    for operation in OPERATIONS:
        if isinstance(node, operation.nodes):
            return operation
    raise LookupError(f"no operation produces {type(node).__name__} nodes")


def operation_for(checker, decl: ast.Decl, body: ast.MapValue) -> Operation | None:
    """The operation that checks a statement: the one that claims it, a fallback only when
    no other does; None when none claims it (the checker reports the unknown method)."""
    claiming = [op for op in OPERATIONS if op.claims(checker, decl, body)]
    specific = [op for op in claiming if not op.fallback]
    chosen = specific or claiming
    return chosen[0] if chosen else None


# ---- helpers operations share ----------------------------------------------------------

def method_word(body: ast.MapValue, key: str = "method") -> str | None:
    """The plain name under `key` (`method: ties` -> "ties"), None when absent or not a name."""
    entry = body.get(key)
    if entry is not None and isinstance(entry.value, ast.Ref) and entry.value.is_plain:
        return entry.value.name
    return None


def referenced(body: ast.MapValue, *keys: str) -> list[str]:
    """The names under `keys` of a body: a reference, or the keys of a map and the names
    of a list (`inputs:`, `attach:`)."""
    names: list[str] = []
    for key in keys:
        entry = body.get(key)
        if entry is None:
            continue
        value = entry.value
        if isinstance(value, ast.Ref):
            names.append(value.name)
        elif isinstance(value, ast.MapValue):
            names += [e.key for e in value.entries]
        elif isinstance(value, ast.ListValue):
            names += [i.name for i in value.items if isinstance(i, ast.Ref)]
    return names


def model_seconds(program: CheckedProgram, model: str, tokens: float, passes: float) -> float:
    """Seconds to run the model `model` over `tokens` tokens `passes` times (a forward pass
    is 1, a training step forward and backward 3): 2 FLOPs per parameter, token and pass,
    at MODEL_FLOPS_PER_SECOND."""
    parameters = sum(s.numel for s in input_specs(program, model))
    return 2 * parameters * tokens * passes / MODEL_FLOPS_PER_SECOND


TRAINING_PASSES = 3
"""A training step's cost in forward passes (the backward pass counts two)."""
SVD_FLOPS = 24
"""FLOPs of a float64 SVD of an m x n matrix per m * n * min(m, n), in float32 matmul
FLOPs (about 12 for LAPACK's divide and conquer, twice that in float64)."""
CHARS_PER_TOKEN = 4
"""Characters of English text per token, for estimates made before any tokenizer runs."""


def text_tokens(text: str) -> int:
    """Tokens of a prompt, estimated from its length."""
    return max(1, len(text) // CHARS_PER_TOKEN)


def input_specs(program: CheckedProgram, name: str) -> tuple[TensorSpec, ...]:
    """The tensors the node `name` produces."""
    node = program.node(name)
    return operation_of(node).output_specs(program, node)


def write_model(provider: Provider, folder: Path, sizes: Sizes, progress: Progress | None,
                dtype: str | None = None) -> Output:
    """A model's safetensors shards and support files (config with `dtype` when given,
    tokenizer, generation config)."""
    specs = provider.specs
    total = sum(nbytes(s) for s in specs)
    files = write_sharded(folder, specs, provider.get, sizes.shard_bytes, on_tensor(total, progress),
                          sizes.chunk_bytes)
    copy_support_files(provider.support_dir, folder, dtype, provider.config)
    return Output(files, len(specs), total, {})


def on_tensor(total: int, progress: Progress | None):
    """A write_sharded callback reporting bytes written so far to `progress`."""
    done = [0]

    def report(spec):
        done[0] += nbytes(spec)
        if progress:
            progress(done[0], total)
    return report


def node_seed(program: CheckedProgram, node) -> int:
    """The node's own `seed:`, else the file's."""
    own = getattr(node, "seed", None)
    return program.seed if own is None else own
