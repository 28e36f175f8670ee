"""Expert bricks (`brick NAME: {kind: experts}`: the FFN neurons of a model split into
equal groups) and top-k routes over them (`route NAME: {method: topk}`)."""
from __future__ import annotations

from cfmlang.compiler.ir import ExpertsNode, RouteNode
from cfmlang.diagnostics import Diagnostic, error
from cfmlang.io.weights import NodeStats
from cfmlang.ops.base import (COPY_BYTES_PER_SECOND, MODEL_FLOPS_PER_SECOND, Operation, method_word, model_seconds,
                              node_seed, referenced, register_operation)
from cfmlang.ops.experts import methods  # noqa: F401  (registers the methods)
from cfmlang.ops.experts.methods import CALIBRATED_SPLITS
from cfmlang.ops.experts.partition import KMEANS_ROUNDS
from cfmlang.ops.experts.routers import NEEDS_DATA
from cfmlang.ops.experts.check import check_experts, check_route
from cfmlang.ops.experts.providers import ExpertsProvider, RouteProvider
from cfmlang.ops.experts.stored import partition_bytes, restore_partition, write_partition
from cfmlang.ops.experts.writer import calibration_record, write_routed


class ExpertsOperation(Operation):
    name = "experts"
    nodes = (ExpertsNode, RouteNode)
    fallback = True     # claims every route; routes over lora bricks belong to adapter_routes

    def claims(self, checker, decl, body) -> bool:
        if decl.keyword == "brick":
            return method_word(body, "kind") == "experts"
        return decl.keyword == "route"

    def references(self, body) -> list[str]:
        return referenced(body, "from", "experts")

    def check(self, checker, declared, body):
        method = checker.method_of(declared.decl, body)
        if method is None:
            return None
        check_node = check_experts if declared.decl.keyword == "brick" else check_route
        return check_node(checker, declared, body, method)

    def attributes(self, node) -> dict:
        if isinstance(node, ExpertsNode):
            return {"op": "experts", "from": node.model, "split": node.split, "count": node.count,
                    "layers": len(node.layers)}
        return {"op": "route", "method": node.method, "experts": node.experts, "router": node.router, "k": node.k}

    def label(self, name: str, attributes: dict) -> str:
        if attributes["op"] == "experts":
            return f"{name}\\nexperts {attributes['split']} x{attributes['count']}"
        return f"{name}\\nroute {attributes['method']} k={attributes['k']} ({attributes['router']})"

    def refuse_output(self, node) -> Diagnostic | None:
        if not isinstance(node, ExpertsNode):
            return None
        return error("E182", f"`{node.name}` is an experts brick, which is not a model to compile", node.span,
                     f"route it and compile the route: `route r: {{method: topk, experts: {node.name}, k: ...}}`, "
                     f"`output: r`")

    def seconds(self, program, node, bytes_read: int) -> float | None:
        """Its inputs read (and a route's model written), a forward pass of the model over
        the calibration tokens when the split or router needs them, then per layer the
        split (k-means rounds over the neurons, or the co-activation products) or the
        router's training epochs over the tokens' FFN inputs."""
        arch, tokens = node.arch, node.calibration.tokens
        if isinstance(node, ExpertsNode):
            model, layers = node.model, len(node.layers)
            neurons, hidden = arch.intermediate_size, arch.hidden_size
            split = {"kmeans": 2 * KMEANS_ROUNDS * neurons * node.count * 2 * hidden,
                     "cooccurrence": 2 * tokens * neurons * neurons,
                     "functional": 2 * KMEANS_ROUNDS * neurons * node.count * 2 * hidden}.get(node.split, 0)
            needs_text = node.split in CALIBRATED_SPLITS
        else:
            experts = program.node(node.experts)
            model, layers = experts.model, len(experts.layers)
            needs_text = node.router in NEEDS_DATA
            split = 2 * 3 * node.epochs * tokens * arch.hidden_size * experts.count if needs_text else 0
        run = model_seconds(program, model, tokens, 1) if needs_text else 0.0
        return bytes_read / COPY_BYTES_PER_SECOND + run + layers * split / MODEL_FLOPS_PER_SECOND

    def provider(self, context, node, providers):
        if isinstance(node, ExpertsNode):
            return ExpertsProvider(node, providers[node.model], context.seed(node), NodeStats())
        return RouteProvider(node, providers[node.experts], context.seed(node), NodeStats())

    def write(self, node, provider, folder, sizes, progress, log):
        if isinstance(node, ExpertsNode):
            return write_partition(provider, folder)
        return write_routed(node, provider, folder, sizes, progress, log)

    def stored_bytes(self, program, node) -> int:
        if not isinstance(node, ExpertsNode):
            return super().stored_bytes(program, node)
        return partition_bytes(node)

    def restorable(self, node) -> bool:
        return isinstance(node, ExpertsNode)

    def restore(self, node, folder, record, providers):
        return restore_partition(node, folder, record, providers[node.model])

    def restore_reads_inputs(self, node) -> bool:
        return isinstance(node, ExpertsNode)

    def manifest(self, program, node, verified) -> dict:
        seed = node_seed(program, node)
        if isinstance(node, ExpertsNode):
            return {"op": "experts", "from": node.model, "layers": list(node.layers), "split": node.split,
                    "count": node.count, "seed": seed, "calibration": calibration_record(node.calibration)}
        return {"op": "route", "method": node.method, "experts": node.experts, "router": node.router,
                "k": node.k, "epochs": node.epochs, "seed": seed, "calibration": calibration_record(node.calibration)}


register_operation(ExpertsOperation())
