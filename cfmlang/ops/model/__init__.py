"""`model` statements: a model read from a source (HF directory, safetensors, GGUF,
package), or derived from another by fusing lora bricks into it (`from:` + `attach:`)."""
from __future__ import annotations

from pathlib import Path

from cfmlang.compiler.ir import AttachNode, ModelNode
from cfmlang.diagnostics import CompileError
from cfmlang.io.provider import SourceProvider
from cfmlang.io.sources import SourceError
from cfmlang.io.gguf import SEAL_FILE, open_source
from cfmlang.ops.base import (COPY_BYTES_PER_SECOND, Operation, SourceCost, input_specs, referenced,
                              register_operation)
from cfmlang.ops.lora.providers import AttachProvider
from cfmlang.ops.model.check import check_model

GGUF_BYTES_PER_SECOND = 27e6
"""Converted (float32) bytes written per second when a GGUF file is converted (SmolLM2:
540 MB in about 20 s)."""


class ModelOperation(Operation):
    name = "model"
    nodes = (ModelNode, AttachNode)

    def claims(self, checker, decl, body) -> bool:
        return decl.keyword == "model"

    def references(self, body) -> list[str]:
        return referenced(body, "from", "attach")

    def check(self, checker, declared, body):
        return check_model(checker, declared.decl, body, declared.base_dir)

    def attributes(self, node) -> dict:
        if isinstance(node, AttachNode):
            return {"op": "attach", "from": node.model, "attach": list(node.adapters)}
        return {"op": "model", "source": f'{node.source.tag} "{node.source.given}"'}

    def label(self, name: str, attributes: dict) -> str:
        if attributes["op"] == "attach":
            return f"{name}\\nfused {', '.join(attributes['attach'])}"
        return f"{name}\\n{attributes['source']}"

    def working_set(self, program, node, chunk_bytes: int) -> int:
        """An attachment holds its adapters whole, and per tensor the weight, the float32
        delta and their sum."""
        if not isinstance(node, AttachNode):
            return super().working_set(program, node, chunk_bytes)
        largest = max((s.numel for s in node.arch.tensors), default=0) * 4
        adapters = sum(s.numel * 4 for name in node.adapters for s in input_specs(program, name))
        return adapters + 3 * largest

    def rate(self, node) -> float | None:
        """An attachment reads the model and its adapters once, adding B @ A tensor by tensor."""
        return COPY_BYTES_PER_SECOND if isinstance(node, AttachNode) else None

    def source_cost(self, node, cache) -> SourceCost | None:
        """A source is read by its consumers; a GGUF file not yet converted is converted
        once (the whole model in float32, about twice over, while it is converted)."""
        if isinstance(node, AttachNode):
            return None
        size = sum(s.nbytes for s in node.arch.tensors)
        if node.source.kind != "gguf" or _converted(node, cache):
            return SourceCost(0, 0, 0, 0.0, "")
        return SourceCost(Path(node.source.path).stat().st_size, size, 2 * size, size / GGUF_BYTES_PER_SECOND,
                          "converted once")

    def provider(self, context, node, providers):
        if isinstance(node, AttachNode):
            return AttachProvider(node, providers[node.model], [providers[a] for a in node.adapters])
        try:
            reader, folder = open_source(node.source, node.allow_pickle, context.cache_dir, context.log)
        except SourceError as exc:
            raise CompileError([exc.diagnostic(node.span)]) from None
        return SourceProvider(reader, folder)

    def manifest(self, program, node, verified) -> dict:
        if isinstance(node, AttachNode):
            return {"op": "attach", "from": node.model, "attach": list(node.adapters)}
        return {"op": "model", "source": {"tag": node.source.tag, "given": node.source.given}}


def _converted(node: ModelNode, cache) -> bool:
    """Whether the GGUF file has a sealed conversion (its seal is checked when it is used)."""
    return (cache.root / "gguf" / cache.file_hash(Path(node.source.path)) / SEAL_FILE).is_file()


register_operation(ModelOperation())
