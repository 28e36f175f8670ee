"""Routing over LoRA bricks at run time (cfmlang.runtime.adapter_mixture):

- `retrieve` (LoraRetriever-style): each adapter is keyed by the mean embedding of its
  sample prompts under the base model (its mean hidden state, after its first
  `embed_layers` layers when given: a cheaper embedder); each input sequence gets the
  `top_k` adapters most similar to it, mixed by a softmax of the similarities or
  uniformly, and applies only those;
- `gate` (X-LoRA/MoLE-style): a linear gate per decoder layer reads the hidden state and
  mixes the `top_k` best-scored adapters per token; trained on `train: {data: ...}`
  (everything else frozen), or untrained: every adapter weighted equally.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from cfmlang.ops.registry import Method, Params, register


class RouteOptions(Params):
    top_k: Annotated[int, Field(ge=1)] = 1
    temperature: Annotated[float, Field(gt=0)] = 1.0


@register
class Retrieve(Method):
    keyword = "route"
    name = "retrieve"
    summary = ("per input sequence, the `top_k` lora bricks whose sample prompts are most "
               "similar to it (mean hidden state of `base`, after its first `embed_layers` layers if "
               "given), mixed by `mix`; only those are applied")

    class Options(RouteOptions):
        mix: Literal["softmax", "uniform"] = "softmax"
        embed_layers: Annotated[int, Field(ge=1)] | None = None
        """The embedder runs the base's first N decoder layers (default: all of them)."""

    class Adapter(Params):
        """Per-adapter parameters: prompts of the inputs it should serve."""

        samples: Annotated[list[str], Field(min_length=1)]

    Input = Adapter


class GateTraining(Params):
    data: str
    """A text file, or .jsonl with one {"text": ...} a line (relative to the .brick file)."""
    steps: Annotated[int, Field(ge=1)] = 50
    lr: Annotated[float, Field(gt=0)] = 1e-2
    seed: Annotated[int, Field(ge=0)] = 0
    max_length: Annotated[int, Field(ge=4)] = 128
    batch_size: Annotated[int, Field(ge=1)] = 4


@register
class Gate(Method):
    keyword = "route"
    name = "gate"
    summary = ("per token, a linear gate per layer on the hidden state mixes the `top_k` best "
               "lora bricks (softmax); `train: {data: FILE, steps: N}` fits the gates")

    class Options(RouteOptions):
        top_k: Annotated[int, Field(ge=1)] = 2
        train: GateTraining | None = None
