"""update: knowledge edits (`method: rome | memit | alphaedit`, facts written into FFN down
projections) and fine-tuning of selected bricks (`method: finetune`)."""
from __future__ import annotations

from pathlib import Path

from cfmlang.compiler.ir import EditNode, FinetuneNode
from cfmlang.ops.base import Operation, node_seed, referenced, register_operation, write_model
from cfmlang.ops.update import alphaedit, finetune, knowledge  # noqa: F401  (registers the methods)
from cfmlang.ops.update.check import edit_node, finetune_node
from cfmlang.ops.update.providers import EditProvider, FinetuneProvider
from cfmlang.ops.update.report import render


class UpdateOperation(Operation):
    name = "update"
    nodes = (EditNode, FinetuneNode)

    def claims(self, checker, decl, body) -> bool:
        return decl.keyword == "update"

    def references(self, body) -> list[str]:
        return referenced(body, "from")

    def check(self, checker, declared, body):
        method = checker.method_of(declared.decl, body)
        if method is None:
            return None
        check_node = finetune_node if issubclass(method, finetune.Finetune) else edit_node
        return check_node(checker, declared.decl, body, method, declared.base_dir)

    def attributes(self, node) -> dict:
        if isinstance(node, FinetuneNode):
            return {"op": "update", "method": "finetune", "from": node.model, "train": list(node.train)}
        return {"op": "update", "method": node.method, "from": node.model, "facts": len(node.facts)}

    def label(self, name: str, attributes: dict) -> str:
        if "train" in attributes:
            return f"{name}\\nfinetune {len(attributes['train'])} bricks"
        return f"{name}\\nupdate {attributes['method']} ({attributes['facts']} facts)"

    def provider(self, context, node, providers):
        kind = FinetuneProvider if isinstance(node, FinetuneNode) else EditProvider
        return kind(node, providers[node.model], context.seed(node), context.log)

    def write(self, node, provider, folder, sizes, progress, log):
        """The updated model, and what the update computed (an edit's report, printed too;
        a fine-tune's losses) for cfm.json."""
        output = write_model(provider, folder, sizes, progress)
        if isinstance(provider, EditProvider):
            log(f"edit report of `{node.name}`:\n{render(provider.report)}")
            output.extras["update"] = {"edited": sorted(provider.changed), "report": provider.report}
        else:
            training = provider.training
            output.extras["update"] = {"trained": sorted(training.weights), "loss_before": training.loss_before,
                                       "loss_after": training.loss_after, "loss_curve": training.loss_curve}
        return output

    def manifest(self, program, node, verified) -> dict:
        seed = node_seed(program, node)
        if isinstance(node, FinetuneNode):
            return {"op": "update", "method": "finetune", "from": node.model, "train": list(node.train),
                    "data": Path(node.data).name, "seed": seed, "options": dict(node.options)}
        return {"op": "update", "method": node.method, "from": node.model, "seed": seed,
                "options": dict(node.options), "facts": len(node.facts), "neighbourhood": len(node.neighbourhood)}


register_operation(UpdateOperation())
