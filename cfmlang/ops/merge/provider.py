"""The merge provider: each tensor of a merged model computed from its inputs' tensors,
a block of rows at a time for elementwise methods."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cfmlang.compiler.ir import MergeNode, TensorSpec
from cfmlang.io.provider import Provider
from cfmlang.io.weights import TORCH_DTYPES, NodeStats, Rows, WeightError
from cfmlang.ops.merge.base import MergeContext, MergeError
from cfmlang.ops.merge.vocabulary import MergedVocabulary
from cfmlang.ops.merge.vocabulary_check import vocabulary_tensors
from cfmlang.ops.registry import evaluate, lookup


@dataclass
class MergeProvider:
    node: MergeNode
    inputs: list[Provider]
    base: Provider | None
    dtype: str | None
    seed: int
    stats: NodeStats = field(default_factory=NodeStats)

    def __post_init__(self):
        self.method = lookup("merge", self.node.method)
        self.options = dict(self.node.options)
        self.num_layers = self.node.arch.num_layers
        first = self.base or self.inputs[0]
        self._first, self.config = first, first.config
        shapes = {s.name: s.shape for s in self.node.arch.tensors}
        self.specs = [TensorSpec(s.name, shapes.get(s.name, s.shape), self.dtype or s.dtype) for s in first.specs]
        self._whole: tuple[str, torch.Tensor | None] = ("", None)
        self.vocabulary = None
        if self.node.vocabulary is not None or self.node.chat_template is not None:
            named = {i.model: p for i, p in zip(self.node.inputs, self.inputs)}
            named.update({self.node.base: self.base} if self.base is not None else {})
            self.vocabulary = MergedVocabulary(self.node, named, first, vocabulary_tensors(self.node.arch),
                                               self.vocabulary_error)
            self.config = self.vocabulary.config(first.config)

    @property
    def support_dir(self):
        """Tokenizer and generation config of the output: the first input's, or a folder
        with the merged tokenizer and chat template."""
        return self.vocabulary.support_dir(self.config) if self.vocabulary else self._first.support_dir

    def vocabulary_error(self, message: str) -> WeightError:
        error = WeightError(f"merge `{self.node.name}`: {message}", self.node.span,
                            "save each input's tokenizer again with transformers (a fast tokenizer)")
        error.code = "E294"
        return error

    def layer_t(self, name: str) -> float:
        layer = self.node.arch.layer_of(name)
        if layer is None:
            return 0.0
        return layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0

    def load(self, provider: Provider, name: str, rows: Rows) -> torch.Tensor:
        tensor = provider.get(name, rows)
        if not tensor.is_floating_point():
            raise WeightError(f"merge `{self.node.name}`: tensor `{name}` has dtype "
                              f"{str(tensor.dtype).removeprefix('torch.')}; merges need floating-point tensors",
                              self.node.span, "the checkpoint is damaged or not a model's weights")
        return tensor.to(TORCH_DTYPES[self.dtype]) if self.dtype else tensor

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        """Elementwise methods compute any block of rows on its own; others compute the
        whole tensor once and hand out its rows."""
        if rows is None or self.method.elementwise:
            return self.compute(name, rows)
        if self._whole[0] != name:
            self._whole = ("", None)   # let the previous tensor go before computing this one
            self._whole = (name, self.compute(name, None))
        return self._whole[1][rows[0]:rows[1]]

    def compute(self, name: str, rows: Rows) -> torch.Tensor:
        t = self.layer_t(name)
        if self.vocabulary is not None and self.vocabulary.aligns(name):
            aligned = self.vocabulary.aligned(name, self.load)
            tensors = [_rows(aligned[i.model], rows) for i in self.node.inputs]
            base = _rows(aligned[self.node.base], rows) if self.base is not None else None
        else:
            tensors = [self.load(p, name, rows) for p in self.inputs]
            base = self.load(self.base, name, rows) if self.base is not None else None
        weights = [{k: evaluate(v, name, t) for k, v in i.params} for i in self.node.inputs]
        options = {k: evaluate(v, name, t) for k, v in self.options.items()}
        context = MergeContext(self.node.name, name, self.seed)
        try:
            result = self.method.merge(tensors, base, weights, options, context)
        except MergeError as exc:
            raise WeightError(f"merge `{self.node.name}` ({self.node.method}), tensor `{name}`: {exc}",
                              self.node.span, exc.help) from None
        if result.is_floating_point() and not all_finite(result):
            raise self.non_finite(name, tensors, base)
        self.stats.count(name)
        want = TORCH_DTYPES[self.dtype] if self.dtype else (tensors[0] if tensors else base).dtype
        return result.to(want)


    def non_finite(self, name: str, tensors: list[torch.Tensor], base) -> WeightError:
        """Name the input that holds NaN/inf, or blame the merge when the inputs are finite."""
        named = [(i.model, t) for i, t in zip(self.node.inputs, tensors)]
        named += [(self.node.base, base)] if base is not None else []
        for model, tensor in named:
            if not all_finite(tensor):
                return WeightError(f"merge `{self.node.name}`: input `{model}` holds NaN or infinite "
                                   f"values in tensor `{name}`", self.node.span,
                                   f"the weights of `{model}` are damaged; download or convert them again")
        return WeightError(f"merge `{self.node.name}` produced NaN or infinite values in "
                           f"tensor `{name}`", self.node.span)


def _rows(tensor: torch.Tensor, rows: Rows) -> torch.Tensor:
    return tensor if rows is None else tensor[rows[0]:rows[1]]


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or infinite. min/max propagate NaN and expose +-inf,
    and unlike isfinite() they allocate no tensor-sized mask."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))
