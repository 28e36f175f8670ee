"""LoRA bricks: read from a PEFT directory (`source:`), trained (`train:`), extracted from
a fine-tune (`extract:`), or merged from other lora bricks with PEFT's
`add_weighted_adapter` semantics (`merge` over lora bricks)."""
from __future__ import annotations

from pathlib import Path

from cfmlang.compiler.ir import LoraExtractNode, LoraMergeNode, LoraSourceNode, LoraTrainNode, TensorSpec
from cfmlang.frontend import ast
from cfmlang.ops.base import (COPY_BYTES_PER_SECOND, MODEL_FLOPS_PER_SECOND, SVD_FLOPS, TRAINING_PASSES, Operation,
                              method_word, model_seconds, node_seed, referenced, register_operation)
from cfmlang.ops.lora import combine, factors  # noqa: F401  (registers the methods)
from cfmlang.ops.lora.check import check_adapter_merge, check_lora, merges_adapters
from cfmlang.ops.lora.factors import is_target
from cfmlang.ops.lora.providers import (ExtractProvider, MergedAdapterProvider, PeftSourceProvider,
                                        StoredAdapterProvider, TrainProvider)
from cfmlang.ops.lora.writer import write_adapter_dir

LABELS = {
    "lora_extract": lambda a: f"lora rank {a['rank']}",
    "lora_source": lambda a: f"lora {a['source']}",
    "lora_train": lambda a: f"lora trained, rank {a['rank']}",
    "lora_merge": lambda a: f"lora merge {a['method']}",
}


class LoraOperation(Operation):
    name = "lora"
    nodes = (LoraSourceNode, LoraTrainNode, LoraExtractNode, LoraMergeNode)

    def claims(self, checker, decl, body) -> bool:
        if decl.keyword == "brick":
            return method_word(body, "kind") == "lora"
        return decl.keyword == "merge" and merges_adapters(checker, body)

    def references(self, body) -> list[str]:
        names = referenced(body, "base", "inputs")
        extract = body.get("extract")
        if extract is not None and isinstance(extract.value, ast.MapValue):
            names += referenced(extract.value, "from", "base")
        return names

    def check(self, checker, declared, body):
        decl = declared.decl
        if decl.keyword == "merge":
            check_adapter_merge(checker, decl, body)
        else:
            check_lora(checker, decl, body, checker.method_of(decl, body), declared.base_dir)
        return checker.nodes.get(decl.name)

    def attributes(self, node) -> dict:
        if isinstance(node, LoraExtractNode):
            return {"op": "lora_extract", "from": node.tuned, "base": node.base, "rank": node.rank}
        if isinstance(node, LoraSourceNode):
            return {"op": "lora_source", "source": f'peft "{node.source.given}"', "base": node.base}
        if isinstance(node, LoraTrainNode):
            options = dict(node.options)
            return {"op": "lora_train", "base": node.base, "rank": options["rank"], "steps": options["steps"]}
        return {"op": "lora_merge", "method": node.combination, "inputs": [i.model for i in node.inputs]}

    def label(self, name: str, attributes: dict) -> str:
        return f"{name}\\n{LABELS[attributes['op']](attributes)}"

    def output_specs(self, program, node) -> tuple[TensorSpec, ...]:
        if isinstance(node, LoraExtractNode):
            return _extracted_specs(node)
        return node.arch.tensors

    def working_set(self, program, node, chunk_bytes: int) -> int:
        if not isinstance(node, LoraExtractNode):
            return super().working_set(program, node, chunk_bytes)
        # tuned and base in float32, the delta, its SVD factors and residual in float64,
        # and the adapter held whole until it is written
        largest = max((s.numel for s in node.arch.tensors), default=0) * 4
        return 2 * largest + 4 * 2 * largest + sum(s.nbytes for s in _extracted_specs(node))

    def seconds(self, program, node, bytes_read: int) -> float | None:
        """Training: `steps` training steps of the base over `batch_size` x `max_length`
        tokens. Extraction and the `svd` combinations: an SVD of every module's delta.
        Other combinations and PEFT sources: their factors copied."""
        if isinstance(node, LoraTrainNode):
            options = dict(node.options)
            tokens = options["steps"] * options["batch_size"] * options["max_length"]
            return model_seconds(program, node.base, tokens, TRAINING_PASSES)
        if isinstance(node, LoraExtractNode) or (isinstance(node, LoraMergeNode) and "svd" in node.combination):
            flops = sum(SVD_FLOPS * rows * columns * min(rows, columns) for rows, columns in _svd_shapes(node))
            return flops / MODEL_FLOPS_PER_SECOND
        return sum(s.numel * 4 for s in self.output_specs(program, node)) / COPY_BYTES_PER_SECOND

    def provider(self, context, node, providers):
        if isinstance(node, LoraExtractNode):
            return ExtractProvider(node, providers[node.tuned], providers[node.base])
        if isinstance(node, LoraSourceNode):
            return PeftSourceProvider(node, providers[node.base])
        if isinstance(node, LoraTrainNode):
            return TrainProvider(node, providers[node.base], context.on_train_step)
        return MergedAdapterProvider(node, [providers[i.model] for i in node.inputs], context.seed(node))

    def write(self, node, provider, folder, sizes, progress, log):
        return write_adapter_dir(provider, folder, progress, log)

    def restorable(self, node) -> bool:
        return True

    def restore(self, node, folder, record, providers):
        return StoredAdapterProvider(folder, record["output"]["extras"]["adapter"])

    def manifest(self, program, node, verified) -> dict:
        if isinstance(node, LoraExtractNode):
            return {"op": "lora_extract", "from": node.tuned, "base": node.base,
                    "rank": node.rank, "threshold": node.threshold, "targets": list(node.targets)}
        if isinstance(node, LoraSourceNode):
            return {"op": "lora_source", "source": {"tag": "peft", "given": node.source.given},
                    "base": node.base, "modules": len(node.modules)}
        if isinstance(node, LoraTrainNode):
            return {"op": "lora_train", "base": node.base, **dict(node.options), "data": _name(node.data.path),
                    "data_sha256": node.data.sha256, "samples": node.data.samples}
        return {"op": "lora_merge", "method": node.combination, "options": dict(node.options),
                "seed": node_seed(program, node),
                "inputs": [{"adapter": i.model, "params": dict(i.params)} for i in node.inputs]}


def _svd_shapes(node) -> list[tuple[int, int]]:
    """(out, in) of the deltas factored by SVD: a combination's modules, an extraction's
    target projections."""
    if isinstance(node, LoraMergeNode):
        return [(m.out_features, m.in_features) for m in node.modules]
    return [s.shape for s in node.arch.tensors if len(s.shape) == 2 and is_target(s.name, list(node.targets))]


def _extracted_specs(node: LoraExtractNode) -> tuple[TensorSpec, ...]:
    """An extracted adapter's A and B factors, counted as one flat tensor per module."""
    return tuple(TensorSpec(s.name, (node.rank * (s.shape[0] + s.shape[1]),), s.dtype)
                 for s in node.arch.tensors if len(s.shape) == 2 and is_target(s.name, list(node.targets)))


def _name(path: str) -> str:
    return Path(path).name


register_operation(LoraOperation())
