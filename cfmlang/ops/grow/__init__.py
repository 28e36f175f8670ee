"""grow: add capacity to a model: new blocks (block_expand), layer slices of models
stacked (stack), a wider FFN (widen), experts from a dense FFN (upcycle) or from
fine-tunes (moe). Function-preserving methods are verified against their input."""
from __future__ import annotations

from cfmlang.compiler.ir import GrowNode
from cfmlang.frontend import ast
from cfmlang.ops.base import COPY_BYTES_PER_SECOND, Operation, referenced, register_operation, write_model
from cfmlang.ops.grow import methods  # noqa: F401  (registers the methods)
from cfmlang.ops.grow.check import check_grow
from cfmlang.ops.registry import lookup
from cfmlang.ops.grow.verify import verify_node, verify_provider


class GrowOperation(Operation):
    name = "grow"
    nodes = (GrowNode,)

    def claims(self, checker, decl, body) -> bool:
        return decl.keyword == "grow"

    def references(self, body) -> list[str]:
        names = referenced(body, "from", "base", "inputs")
        slices = body.get("slices")
        if slices is not None and isinstance(slices.value, ast.ListValue):
            for item in slices.value.items:
                chosen = item.get("from") if isinstance(item, ast.MapValue) else None
                ref = chosen.value if chosen else item
                if isinstance(ref, ast.Ref):
                    names.append(ref.name)
        return names

    def check(self, checker, declared, body):
        method = checker.method_of(declared.decl, body)
        return None if method is None else check_grow(checker, declared.decl, body, method)

    def attributes(self, node) -> dict:
        return {"op": "grow", "method": node.method, "inputs": list(node.inputs),
                "layers": node.arch.num_layers, "new_layers": list(node.arch.new_layers)}

    def working_set(self, program, node, chunk_bytes: int) -> int:
        """The method's float32 copies of the largest output tensor (a widened FFN
        projection, an expert) while it is computed, beside the one being written."""
        largest = max((s.numel for s in node.arch.tensors), default=0) * 4
        return (lookup("grow", node.method).working_copies + 1) * largest

    def seconds(self, program, node, bytes_read: int) -> float | None:
        """The output's bytes (a grown model may be many times its input) copied at the
        copy rate."""
        return sum(s.numel * 4 for s in node.arch.tensors) / COPY_BYTES_PER_SECOND

    def provider(self, context, node, providers):
        return lookup("grow", node.method).provider(node, providers, context.seed(node))

    def write(self, node, provider, folder, sizes, progress, log):
        """The grown model; a function-preserving one is then run next to its input and
        the largest logit difference recorded (the compile stops when it exceeds the
        tolerance)."""
        output = write_model(provider, folder, sizes, progress, getattr(provider, "dtype", None))
        if node.tolerance is not None:
            output.extras["verified"] = {node.name: _logged(node, verify_node(node, provider.reference, folder), log)}
        return output

    def verify(self, node, provider, log) -> dict | None:
        if node.tolerance is None:
            return None
        return _logged(node, verify_provider(node, provider), log)

    def manifest(self, program, node, verified) -> dict:
        entry = {"op": "grow", "method": node.method, "inputs": list(node.inputs),
                 "options": dict(node.options), "num_layers": node.arch.num_layers,
                 "new_layers": list(node.arch.new_layers), "verify": verified or {"check": "none"}}
        if node.layers:
            entry["layers"] = [{"model": s.model, "layer": s.layer, "new": s.new} for s in node.layers]
        return entry


def _logged(node: GrowNode, result, log) -> dict:
    log(f"verified `{node.name}`: max |Δlogit| {result.max_abs_logit_diff:.3g} against "
        f"`{result.reference}` (tolerance {result.tolerance:g})")
    return result.to_json()


register_operation(GrowOperation())
