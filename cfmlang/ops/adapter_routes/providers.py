"""Executing `route ... method: retrieve | gate` over lora bricks (part of the execute stage).

The provider serves the base model's tensors unchanged (the artifact is the base plus
its adapters and router) and builds, once, what the run-time mixture needs: every
adapter's factors, and the router (retrieval keys from the adapters' sample prompts, or
per-layer gates, trained on the node's text when it has one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cfmlang.compiler.ir import AdapterRouteNode
from cfmlang.io.materialise import materialise
from cfmlang.io.weights import NodeStats, Rows
from cfmlang.runtime.adapter_mixture import AdapterMixture, new_gates, prompt_embedding, train_gates
from cfmlang.ops.update.finetune import read_texts


@dataclass(frozen=True)
class BuiltRouter:
    tensors: dict[str, torch.Tensor]     # `embeddings`, or `gates.N.weight` per layer
    losses: tuple[float, ...]            # the gate's training loss per step (empty if untrained)


@dataclass
class AdapterRouteProvider:
    node: AdapterRouteNode
    base: object                  # the base model's Provider
    adapters: list                # AdapterProviders, in the node's order
    on_step: object = None        # called with (name, step, steps, loss) while training gates
    stats: NodeStats = field(default_factory=NodeStats)
    _router: BuiltRouter | None = None

    def __post_init__(self):
        self.specs, self.support_dir, self.config = self.base.specs, self.base.support_dir, self.base.config
        self.options = dict(self.node.options)

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        self.stats.count(name)
        return self.base.get(name, rows)

    def adapter_modules(self) -> list[dict]:
        return [provider.adapter().modules for provider in self.adapters]

    def router(self) -> BuiltRouter:
        if self._router is None:
            model, tokenizer = materialise(self.base, self.node.span)
            self._router = (self._retrieval_keys if self.node.method == "retrieve" else self._gates)(model, tokenizer)
        return self._router

    def _retrieval_keys(self, model, tokenizer) -> BuiltRouter:
        layers = self.options.get("embed_layers")
        keys = torch.stack([prompt_embedding(model, tokenizer, list(samples), layers) for samples in self.node.samples])
        return BuiltRouter({"embeddings": keys}, ())

    def _gates(self, model, tokenizer) -> BuiltRouter:
        gates = new_gates(model, len(self.adapters))
        losses: list[float] = []
        if self.node.data is not None:
            mixture = AdapterMixture(model, self.adapter_modules(), list(self.node.adapters), "gate",
                                     self.options["top_k"], temperature=self.options["temperature"], gates=gates)
            steps = self.options["train_steps"]
            report = self.on_step or (lambda name, step, total, loss: None)
            losses = train_gates(mixture, self.batches(tokenizer), steps, self.options["train_lr"],
                                 self.options["train_seed"],
                                 lambda step, loss: report(self.node.name, step, steps, loss))
        tensors = {f"gates.{i}.weight": gate.weight.detach().clone() for i, gate in enumerate(gates)}
        return BuiltRouter(tensors, tuple(losses))

    def batches(self, tokenizer) -> list[torch.Tensor]:
        """The training text cut into windows of `max_length` tokens, `batch_size` a batch."""
        ids = [i for text in read_texts(Path(self.node.data)) for i in tokenizer(text)["input_ids"]]
        length, size = self.options["train_max_length"], self.options["train_batch_size"]
        windows = [ids[start:start + length] for start in range(0, len(ids) - length + 1, length)] or [ids]
        return [torch.tensor(windows[start:start + size]) for start in range(0, len(windows), size)]
