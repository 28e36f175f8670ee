"""The typed IR produced by the checker: names bound, parameters validated, shapes known.

No weights are loaded to build it: architectures come from config.json, safetensors
headers and GGUF metadata.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

from cfmlang.architectures import Architecture
from cfmlang.diagnostics import Diagnostic, Span

FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
"""The dtype names a program may use, and their safetensors codes."""
MERGEABLE_DTYPES = tuple(FLOAT_DTYPES.values())
"""Safetensors dtypes a merge can read."""

ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
"""Bytes per element of each safetensors dtype code."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str          # safetensors dtype code: F32, F16, BF16, F64 ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor as stored (4 per element for an unknown dtype code)."""
        return self.numel * ITEMSIZE.get(self.dtype, 4)


@dataclass(frozen=True)
class ArchInfo:
    """What the checker knows of a model before reading any weight."""

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    intermediate_size: int
    tensors: tuple[TensorSpec, ...]
    new_layers: tuple[int, ...] = ()
    """Layers added by a grow method (block_expand), for statements that select them."""
    layout: Architecture | None = None
    """How the family names and groups its tensors (None: a family cfmlang cannot
    describe; operations that need layers then refuse it)."""

    def tensor(self, name: str) -> TensorSpec | None:
        return next((t for t in self.tensors if t.name == name), None)

    def layer_of(self, tensor_name: str) -> int | None:
        """The layer a tensor belongs to (None outside the layers, or without a layout)."""
        return self.layout.layer_of(tensor_name) if self.layout else None


@dataclass(frozen=True)
class Source:
    """A resolved weight source. `kind` is hf (a directory), gguf (a file) or
    safetensors (a file with config.json beside it)."""

    tag: str
    given: str
    kind: str
    path: str


class NodeKind(str, Enum):
    """What a node's output is: a model (tensors others may read), a LoRA adapter, expert
    bricks (a partition, not a model), or a routed model (a model plus run-time routing)."""

    MODEL = "model"
    ADAPTER = "adapter"
    EXPERTS = "experts"
    ROUTED = "routed model"


@dataclass(frozen=True)
class IRNode:
    """What every node of the IR has: its name, its statement's span, the architecture of
    its output (`arch`), its kind (`node_type`) and the names of the nodes it reads (`deps`)."""

    name: str
    span: Span

    @property
    def deps(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class ModelNode(IRNode):
    source: Source
    allow_pickle: bool
    arch: ArchInfo
    node_type: NodeKind = NodeKind.MODEL

    @property
    def deps(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class MergeInput:
    model: str
    params: tuple[tuple[str, Any], ...]
    span: Span


@dataclass(frozen=True)
class TokenSource:
    """Where a merged model's embedding rows for one token come from (an entry of a
    merge's `tokenizer: {tokens: ...}`): `model` (that token's rows in the model `model`),
    `model_token` (the rows of `token`, or of id `token_id`, in `model`), `zero`, or
    `mean` (the average over the inputs that have the token)."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenRule:
    """A per-token override of a merge's vocabulary alignment; with `force`, the rows of
    every input are replaced even where the input has the token."""

    token: str
    source: TokenSource
    force: bool = False


@dataclass(frozen=True)
class VocabularyPlan:
    """A merge's output vocabulary (mergekit's `tokenizer:`): `source` is "base",
    "union" or the name of an input; `vocab_size` is the rows of the output's
    embeddings (the tokenizer's size, padded up to `pad_to_multiple_of`)."""

    source: str
    tokens: tuple[TokenRule, ...]
    pad_to_multiple_of: int | None
    vocab_size: int


@dataclass(frozen=True)
class MergeNode(IRNode):
    method: str
    base: str | None
    inputs: tuple[MergeInput, ...]
    options: tuple[tuple[str, Any], ...]
    dtype: str | None
    seed: int | None
    arch: ArchInfo
    node_type: NodeKind = NodeKind.MODEL
    vocabulary: VocabularyPlan | None = None
    """Set when the inputs' vocabularies are aligned to a new tokenizer."""
    chat_template: str | None = None
    """The Jinja chat template written into the output's tokenizer config."""

    @property
    def deps(self) -> tuple[str, ...]:
        names = [i.model for i in self.inputs]
        if self.base and self.base not in names:
            names.insert(0, self.base)
        return tuple(names)


@dataclass(frozen=True)
class LoraExtractNode(IRNode):
    """A LoRA adapter extracted from the difference `tuned - base`."""

    tuned: str
    base: str
    rank: int
    threshold: float
    targets: tuple[str, ...]
    arch: ArchInfo
    modules: tuple[LoraModuleSpec, ...] = ()
    node_type: NodeKind = NodeKind.ADAPTER

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.base, self.tuned)


@dataclass(frozen=True)
class Calibration:
    """Text run through a model to measure activations, at most `tokens` tokens of it.

    `origin`: "file" (the text file `path`), "corpus" (the shipped corpus), "probes" (the
    probe prompts in the directory `path`, or the shipped probe sets when it is None) or
    "generated" (`tokens` tokens the model samples itself, seeded by the node's seed)."""

    path: str | None
    tokens: int
    origin: str = "file"


@dataclass(frozen=True)
class ExpertsNode(IRNode):
    """Emergent expert bricks: the FFN neurons of `layers` of `model` split into `count`
    equal groups."""

    model: str
    layers: tuple[int, ...]
    split: str
    count: int
    seed: int | None                 # None: the file-level seed
    calibration: Calibration
    arch: ArchInfo
    node_type: NodeKind = NodeKind.EXPERTS

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.model,)


@dataclass(frozen=True)
class Fact:
    """A fact to write into a model: `prompt` (containing `subject`) should be completed
    by `target`; `paraphrases` are other prompts for the same fact (report only). A
    counterfact also names the answer it replaces (`target_true`) and `neighbourhood`
    prompts whose true answer is that one too: the report then measures the CounterFact
    metrics."""

    prompt: str
    subject: str
    target: str
    paraphrases: tuple[str, ...]
    target_true: str | None = None
    neighbourhood: tuple[str, ...] = ()


@dataclass(frozen=True)
class EditNode(IRNode):
    """A knowledge edit (`update` with method rome or memit) of `model`."""

    method: str
    model: str
    facts: tuple[Fact, ...]
    neighbourhood: tuple[str, ...]
    options: tuple[tuple[str, Any], ...]
    seed: int | None
    arch: ArchInfo
    node_type: NodeKind = NodeKind.MODEL

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.model,)


@dataclass(frozen=True)
class RouteNode(IRNode):
    """A model whose expert-split FFNs run only the top-`k` experts per token."""

    method: str
    experts: str
    router: str
    k: int
    epochs: int
    seed: int | None                 # None: the file-level seed
    calibration: Calibration
    arch: ArchInfo
    node_type: NodeKind = NodeKind.ROUTED

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.experts,)


@dataclass(frozen=True)
class AdapterRouteNode(IRNode):
    """A model that mixes lora bricks per input: `retrieve` (per sequence, keyed by each
    adapter's `samples`) or `gate` (per token; trained on `data` when given)."""

    method: str
    base: str
    adapters: tuple[str, ...]
    samples: tuple[tuple[str, ...], ...]      # per adapter (retrieve); empty for gate
    options: tuple[tuple[str, Any], ...]      # top_k, temperature, mix / training settings
    data: str | None                          # resolved path of the gate's training text
    arch: ArchInfo
    node_type: NodeKind = NodeKind.ROUTED

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.base,) + self.adapters


@dataclass(frozen=True)
class FinetuneNode(IRNode):
    """`update` with method finetune: train the tensors under `train` (name prefixes such
    as `model.layers.4.`) of `model` on the texts of `data`; everything else is frozen."""

    model: str
    train: tuple[str, ...]
    data: str
    options: tuple[tuple[str, Any], ...]
    seed: int | None
    arch: ArchInfo
    node_type: NodeKind = NodeKind.MODEL

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.model,)


@dataclass(frozen=True)
class LoraModuleSpec:
    """One adapted linear layer as the checker knows it: the module path in the base
    (`model.layers.0.self_attn.q_proj`), its rank, and the shape of the base weight."""

    module: str
    rank: int
    out_features: int
    in_features: int

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"


@dataclass(frozen=True)
class LoraSourceNode(IRNode):
    """A PEFT adapter directory, checked against its base from headers only."""

    source: Source
    base: str
    config: dict              # adapter_config.json as read
    modules: tuple[LoraModuleSpec, ...]
    arch: ArchInfo
    node_type: NodeKind = NodeKind.ADAPTER

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.base,)


@dataclass(frozen=True)
class TrainData:
    path: str
    samples: int
    sha256: str


@dataclass(frozen=True)
class LoraTrainNode(IRNode):
    """A new adapter fine-tuned on `data` from `base`."""

    base: str
    data: TrainData
    options: tuple[tuple[str, Any], ...]      # steps, rank, alpha, lr, seed, targets ...
    modules: tuple[LoraModuleSpec, ...]
    arch: ArchInfo
    node_type: NodeKind = NodeKind.ADAPTER

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.base,)


@dataclass(frozen=True)
class LoraMergeNode(IRNode):
    """A merge over LoRA bricks with PEFT `add_weighted_adapter` semantics."""

    combination: str
    inputs: tuple[MergeInput, ...]
    options: tuple[tuple[str, Any], ...]      # density, majority_sign_method, svd_rank, svd_clamp
    seed: int | None
    base: str
    modules: tuple[LoraModuleSpec, ...]
    arch: ArchInfo
    node_type: NodeKind = NodeKind.ADAPTER

    @property
    def deps(self) -> tuple[str, ...]:
        return tuple(i.model for i in self.inputs)


@dataclass(frozen=True)
class AttachNode(IRNode):
    """A model with static adapters fused into its weights: W + scale * B @ A."""

    model: str
    adapters: tuple[str, ...]
    arch: ArchInfo
    node_type: NodeKind = NodeKind.MODEL

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.model,) + self.adapters


@dataclass(frozen=True)
class LayerSource:
    """Where one layer of a grown model comes from: a layer of an input model, either
    as it is or as a new block (output projections zeroed), with per-slice parameters
    evaluated at position `t` of the slice."""

    model: str
    layer: int
    new: bool
    params: tuple[tuple[str, Any], ...] = ()
    t: float = 0.0


@dataclass(frozen=True)
class GrowNode(IRNode):
    """A model grown from `inputs` (one, or the models of `stack` slices, in order).

    `layers` is the origin of every output layer for depth methods (empty for widen and
    upcycle); `tolerance` is set when identity verification runs, against `inputs[0]`."""

    method: str
    inputs: tuple[str, ...]
    layers: tuple[LayerSource, ...]
    options: tuple[tuple[str, Any], ...]
    tolerance: float | None
    seed: int | None
    arch: ArchInfo
    node_type: NodeKind = NodeKind.MODEL

    @property
    def deps(self) -> tuple[str, ...]:
        return self.inputs


Node = Union[ModelNode, MergeNode, AttachNode, LoraExtractNode, LoraSourceNode, LoraTrainNode, LoraMergeNode,
             ExpertsNode, RouteNode, EditNode, FinetuneNode, AdapterRouteNode, GrowNode]


@dataclass(frozen=True)
class CheckedProgram:
    root: str
    nodes: tuple[Node, ...]
    output: str | None
    seed: int
    dtype: str | None
    files: tuple[tuple[str, str], ...]          # (path, sha256) of every .brick file read
    warnings: tuple[Diagnostic, ...] = field(default=())

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)
