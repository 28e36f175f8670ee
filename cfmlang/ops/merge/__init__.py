"""merge: weight-space merges of whole models (mergekit semantics). A method is one
registered `MergeMethod` class (linear.py, sparse.py, spherical.py, other.py)."""
from __future__ import annotations

from cfmlang.compiler.ir import FLOAT_DTYPES, MergeNode, TensorSpec
from cfmlang.ops.base import Operation, node_seed, referenced, register_operation, write_model
from cfmlang.ops.merge import linear, other, sparse, spherical  # noqa: F401  (registers the methods)
from cfmlang.ops.merge.check import check_merge
from cfmlang.ops.merge.provider import MergeProvider
from cfmlang.ops.merge.vocabulary_check import vocabulary_manifest
from cfmlang.ops.registry import lookup

BYTES_PER_SECOND = {
    # bytes of input merged per second on the 2-core reference machine: each method's
    # speed relative to linear, measured by benchmarks/plan_rates.py (on a loaded machine:
    # ratios are good to perhaps +-30%), times linear's rate in benchmarks/README.md
    "linear": 760e6, "slerp": 840e6, "nuslerp": 460e6, "multislerp": 280e6, "karcher": 78e6,
    "task_arithmetic": 230e6, "ties": 66e6, "dare_ties": 130e6, "dare_linear": 120e6,
    "breadcrumbs": 120e6, "breadcrumbs_ties": 94e6, "della": 64e6, "della_linear": 110e6,
    "model_stock": 620e6, "sce": 180e6, "nearswap": 230e6, "arcee_fusion": 98e6, "ram": 260e6,
    "ramplus_tl": 260e6, "passthrough": 740e6,
}


class MergeOperation(Operation):
    name = "merge"
    nodes = (MergeNode,)
    fallback = True     # a merge over lora bricks belongs to the lora operation
    distributable = True

    def claims(self, checker, decl, body) -> bool:
        return decl.keyword == "merge"

    def references(self, body) -> list[str]:
        return referenced(body, "base", "inputs")

    def check(self, checker, declared, body):
        method = checker.method_of(declared.decl, body)
        return None if method is None else check_merge(checker, declared.decl, body, method, declared.base_dir)

    def attributes(self, node) -> dict:
        return {"op": "merge", "method": node.method, "base": node.base or "",
                "inputs": [i.model for i in node.inputs], "dtype": node.dtype or ""}

    def output_specs(self, program, node) -> tuple[TensorSpec, ...]:
        code = _dtype_code(program, node)
        return tuple(TensorSpec(s.name, s.shape, code or s.dtype) for s in node.arch.tensors)

    def working_set(self, program, node, chunk_bytes: int) -> int:
        """Elementwise methods hold (2 * inputs + 3) float32 blocks of `chunk_bytes`; the
        others (3 * inputs + 4) float32 copies of the largest tensor (task vectors, masks,
        the held result); a merge of vocabularies also holds every input's aligned
        embeddings (one copy of the largest tensor per input)."""
        largest = max((s.numel for s in node.arch.tensors), default=0) * 4
        inputs = len(node.deps)
        aligned = inputs * largest if node.vocabulary is not None else 0   # each input's rows, aligned
        if lookup("merge", node.method).elementwise:
            return (2 * inputs + 3) * min(chunk_bytes, largest) + aligned
        return (3 * inputs + 4) * largest + aligned

    def rate(self, node) -> float | None:
        return BYTES_PER_SECOND.get(node.method)

    def provider(self, context, node, providers):
        return MergeProvider(node, [providers[i.model] for i in node.inputs],
                             providers[node.base] if node.base else None,
                             _dtype_code(context.program, node), context.seed(node))

    def write(self, node, provider, folder, sizes, progress, log):
        return write_model(provider, folder, sizes, progress, provider.dtype)

    def manifest(self, program, node, verified) -> dict:
        entry = {"op": "merge", "method": node.method, "base": node.base,
                 "dtype": node.dtype or program.dtype,
                 "seed": node_seed(program, node),
                 "options": dict(node.options),
                 "inputs": [{"model": i.model, "params": dict(i.params)} for i in node.inputs]}
        return {**entry, **vocabulary_manifest(node)}


def _dtype_code(program, node) -> str | None:
    """The safetensors code of the merge's output dtype (the node's, else the file's)."""
    dtype = node.dtype or program.dtype
    return FLOAT_DTYPES[dtype] if dtype else None


register_operation(MergeOperation())
