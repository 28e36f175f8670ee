"""Identity verification of grown models, right after a grown model is written (into
the artifact's temporary directory or a cache entry, before either is put in place).

A grow node with a tolerance (`verify: identity`, the default for function-preserving
methods) is run next to its input on seeded probe token ids; if the largest logit
difference exceeds the tolerance times the input's largest |logit| (at least 1),
compiling fails with E110 and nothing is written. The tolerance is relative because
float32 rounding is: the same function summed in another order moves SmolLM2's logits
(up to about 20) by 1.5e-4 on one CPU and less on another. Both models run in float32
whatever their storage dtype."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cfmlang.artifact.write import write_sharded
from cfmlang.io.provider import SourceProvider
from cfmlang.compiler.ir import GrowNode
from cfmlang.io.sources import SourceError, weight_files
from cfmlang.io.weights import SafetensorsReader
from cfmlang.diagnostics import CompileError, error
from cfmlang.ops.merge.base import MergeContext

PROBE_SHAPE = (2, 16)
"""Probe sequences x tokens per grown model."""


@dataclass(frozen=True)
class Verified:
    reference: str
    max_abs_logit_diff: float
    tolerance: float
    logit_scale: float       # the input's largest |logit| on the probes, at least 1

    @property
    def allowed(self) -> float:
        return self.tolerance * self.logit_scale

    def to_json(self) -> dict:
        return {"check": "identity", "reference": self.reference, "tolerance": self.tolerance,
                "max_abs_logit_diff": self.max_abs_logit_diff,
                "probe": {"sequences": PROBE_SHAPE[0], "tokens": PROBE_SHAPE[1]}}


def verify_node(node: GrowNode, reference, grown_dir: Path) -> Verified:
    """Run the grown model written in `grown_dir` next to its input (`reference`, a
    provider); raises CompileError (E110) when they differ by more than the tolerance."""
    with tempfile.TemporaryDirectory(prefix="cfm-verify-") as scratch:
        reference_dir = loadable_dir(reference) or materialize(reference, Path(scratch) / "reference")
        ids = probe_ids(node)
        diff, scale = max_logit_difference(reference_dir, grown_dir, ids)
    verified = Verified(node.inputs[0], diff, node.tolerance, scale)
    if not diff <= verified.allowed:
        raise CompileError([_failure(node, verified, ids.numel())])
    return verified


def verify_provider(node: GrowNode, provider) -> Verified:
    """verify_node for a grown model that is not written anywhere (pulled through by its
    consumers): it is written to scratch space first."""
    with tempfile.TemporaryDirectory(prefix="cfm-grown-") as scratch:
        return verify_node(node, provider.reference, materialize(provider, Path(scratch) / node.name))


def _failure(node: GrowNode, verified: Verified, tokens: int):
    return error(
        "E110", f"`grow {node.name}` ({node.method}) does not compute the same function as "
        f"`{verified.reference}`: max |Δlogit| = {verified.max_abs_logit_diff:.3g} > {verified.allowed:.3g} "
        f"(tolerance {node.tolerance:g} x largest |logit| {verified.logit_scale:.3g}) on {tokens} probe tokens",
        node.span,
        "if the difference is rounding of low-precision weights, raise `tolerance:`; "
        "`verify: none` skips the check", "nothing was written")


def probe_ids(node: GrowNode) -> torch.Tensor:
    """Token ids seeded by the node's name: the same probes in every compile."""
    generator = MergeContext(node.name, "verify", 0).generator()
    return torch.randint(node.arch.vocab_size, PROBE_SHAPE, generator=generator)


def max_logit_difference(reference_dir: Path, grown_dir: Path, ids: torch.Tensor) -> tuple[float, float]:
    """The largest |logit difference| and the reference's largest |logit| (at least 1)."""
    reference = _logits(reference_dir, ids)
    grown = _logits(grown_dir, ids)
    return float((reference - grown).abs().max()), max(1.0, float(reference.abs().max()))


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        return model(ids).logits.double()


def loadable_dir(provider) -> Path | None:
    """The directory transformers can load `provider` from as it is, if there is one."""
    if not isinstance(provider, SourceProvider) or not isinstance(provider.reader, SafetensorsReader):
        return None
    try:
        standard = weight_files(provider.support_dir, False)
    except SourceError:
        return None
    read = sorted({path for path, _, _ in provider.reader.location.values()})
    return provider.support_dir if read == sorted(standard) else None


def materialize(provider, folder: Path) -> Path:
    """Write a provider's tensors and config.json to `folder` (for loading it)."""
    folder.mkdir(parents=True)
    write_sharded(folder, provider.specs, provider.get)
    (folder / "config.json").write_text(json.dumps(provider.config))
    return folder
