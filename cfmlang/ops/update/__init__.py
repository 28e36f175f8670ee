"""update: knowledge edits (`method: rome | memit | alphaedit`, facts written into FFN down
projections) and fine-tuning of selected bricks (`method: finetune`)."""
from __future__ import annotations

from pathlib import Path

from cfmlang.compiler.ir import EditNode, FinetuneNode
from cfmlang.ops.base import (CHARS_PER_TOKEN, TRAINING_PASSES, Operation, model_seconds, node_seed, referenced, register_operation,
                              text_tokens, write_model)
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

    def seconds(self, program, node, bytes_read: int) -> float | None:
        """Fine-tuning: `steps` training steps over `batch_size` x `max_length` tokens, and
        two forward passes over its data (the loss before and after). An
        edit: the key statistics (a forward pass over its calibration text), the value
        search (`steps` training steps per fact over its prompt after each prefix) and the
        report (greedy completions before and after, of every fact, paraphrase and
        neighbourhood prompt)."""
        options = dict(node.options)
        if isinstance(node, FinetuneNode):
            tokens = options["steps"] * options["batch_size"] * options["max_length"]
            data = _size(node.data) // CHARS_PER_TOKEN           # its loss before and after: two passes
            return model_seconds(program, node.model, tokens, TRAINING_PASSES) + \
                model_seconds(program, node.model, data, 2)
        statistics = 0 if options.get("covariance") == "identity" else \
            options.get("calibration_texts", 0) * options.get("calibration_tokens", 0)
        prefixes = options.get("prefixes") or [""]
        search = sum(options.get("steps", 1) * text_tokens(prefix + fact.prompt + fact.target)
                     for fact in node.facts for prefix in prefixes)
        prompts = [f.prompt for f in node.facts] + [p for f in node.facts for p in f.paraphrases] + \
            list(node.neighbourhood)
        report = sum(2 * (text_tokens(prompt) + options.get("report_tokens", 0)) for prompt in prompts)
        return model_seconds(program, node.model, statistics + report, 1) + \
            model_seconds(program, node.model, search, TRAINING_PASSES)

    def provider(self, context, node, providers):
        kind = FinetuneProvider if isinstance(node, FinetuneNode) else EditProvider
        return kind(node, providers[node.model], context.seed(node), context.log)

    def write(self, node, provider, folder, sizes, progress, log):
        """The updated model, and what the update computed (an edit's report, printed too;
        a fine-tune's losses) for the node's entry in cfm.json."""
        output = write_model(provider, folder, sizes, progress)
        if isinstance(provider, EditProvider):
            log(f"edit report of `{node.name}`:\n{render(provider.report)}")
            output.extras["node"] = {"edited": sorted(provider.changed), "report": provider.report}
        else:
            training = provider.training
            output.extras["node"] = {"trained": sorted(training.weights), "loss_before": training.loss_before,
                                       "loss_after": training.loss_after, "loss_curve": training.loss_curve}
        return output

    def manifest(self, program, node, verified) -> dict:
        seed = node_seed(program, node)
        if isinstance(node, FinetuneNode):
            return {"op": "update", "method": "finetune", "from": node.model, "train": list(node.train),
                    "data": Path(node.data).name, "seed": seed, "options": dict(node.options)}
        return {"op": "update", "method": node.method, "from": node.model, "seed": seed,
                "options": dict(node.options), "facts": len(node.facts), "neighbourhood": len(node.neighbourhood)}


def _size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


register_operation(UpdateOperation())
