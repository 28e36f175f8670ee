"""Routes over lora bricks: per-sequence retrieval (`route NAME: {method: retrieve}`) and
per-token gates (`method: gate`); the artifact is the base model, every adapter's factors
and the router, mixed at run time."""
from __future__ import annotations

from pathlib import Path

from cfmlang.compiler.ir import AdapterRouteNode
from cfmlang.ops.adapter_routes import methods
from cfmlang.ops.adapter_routes.check import check_adapter_route
from cfmlang.ops.adapter_routes.providers import AdapterRouteProvider
from cfmlang.ops.adapter_routes.writer import write_adapter_route
from cfmlang.ops.base import (COPY_BYTES_PER_SECOND, TRAINING_PASSES, Operation, method_word, model_seconds, referenced, register_operation,
                              text_tokens)

METHODS = (methods.Retrieve.name, methods.Gate.name)


class AdapterRouteOperation(Operation):
    name = "adapter_routes"
    nodes = (AdapterRouteNode,)

    def claims(self, checker, decl, body) -> bool:
        return decl.keyword == "route" and method_word(body) in METHODS

    def references(self, body) -> list[str]:
        return referenced(body, "base", "inputs")

    def check(self, checker, declared, body):
        method = checker.method_of(declared.decl, body)
        return None if method is None else check_adapter_route(checker, declared, body, method)

    def attributes(self, node) -> dict:
        return {"op": "route", "method": node.method, "base": node.base, "adapters": list(node.adapters)}

    def label(self, name: str, attributes: dict) -> str:
        return f"{name}\\nroute {attributes['method']} over {', '.join(attributes['adapters'])}"

    def seconds(self, program, node, bytes_read: int) -> float | None:
        """Its inputs read and written beside the router; retrieve: a forward pass of the
        base over every adapter's samples; gate: its training steps (if any) over
        `batch_size` x `max_length` tokens of its data."""
        training = dict(node.options).get("train")
        tokens = sum(text_tokens(sample) for samples in node.samples for sample in samples)
        seconds = bytes_read / COPY_BYTES_PER_SECOND + model_seconds(program, node.base, tokens, 1)
        if training:
            steps = training["steps"] * training["batch_size"] * training["max_length"]
            seconds += model_seconds(program, node.base, steps, TRAINING_PASSES)
        return seconds

    def provider(self, context, node, providers):
        return AdapterRouteProvider(node, providers[node.base], [providers[a] for a in node.adapters],
                                    context.on_train_step)

    def write(self, node, provider, folder, sizes, progress, log):
        return write_adapter_route(node, provider, folder, sizes, progress, log)

    def manifest(self, program, node, verified) -> dict:
        return {"op": "route", "method": node.method, "base": node.base, "adapters": list(node.adapters),
                "options": dict(node.options), "data": Path(node.data).name if node.data else None}


register_operation(AdapterRouteOperation())
