"""Calibration: run a model on text and record the inputs of its FFNs.

The text is a user's file, the shipped corpus (`cfmlang/ops/experts/data/calibration.txt`:
prose, code, arithmetic, dialogue, letters and several languages, written for the
project), the probe prompts of `cfmc analyze`, or text the model samples itself from a
seed. It is tokenized with the model's own tokenizer, cut into windows of `WINDOW`
tokens, and capped at the requested token count.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from cfmlang.analysis.probes import read_probes
from cfmlang.compiler.ir import Calibration
from cfmlang.architectures import layer_module
from cfmlang.io.datafile import read_data_text
from cfmlang.io.text import WINDOW, sampled_tokens, windows
from cfmlang.io.weights import WeightError

MIN_TOKENS = 64


class CalibrationError(WeightError):
    """Calibration cannot run: no tokenizer, or too little text."""

    def __init__(self, code: str, message: str, span=None, help: str = ""):
        super().__init__(message, span, help)
        self.code = code


def corpus_text(calibration: Calibration) -> str:
    """The text of a calibration that is text (not generated)."""
    if calibration.origin == "probes":
        texts, _ = read_probes(None if calibration.path is None else Path(calibration.path))
        return "\n\n".join(prompt for prompts in texts.prompts for prompt in prompts)
    if calibration.origin == "corpus":
        return resources.files("cfmlang.ops.experts").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    return read_data_text(Path(calibration.path), errors="replace")


def describe(calibration: Calibration) -> str:
    return {"corpus": "the shipped corpus", "probes": "the probe prompts",
            "generated": "generated text"}.get(calibration.origin, str(calibration.path))


def calibration_ids(tokenizer, calibration: Calibration, model, seed: int) -> list[int]:
    """Token ids of the calibration text; generated text is sampled from `model` in
    sequences of WINDOW tokens, seeded."""
    if calibration.origin != "generated":
        return tokenizer(corpus_text(calibration), add_special_tokens=False)["input_ids"][: calibration.tokens]

    sequences = -(-calibration.tokens // WINDOW)
    return sampled_tokens(model, tokenizer, sequences, WINDOW - 1, seed).reshape(-1)[: calibration.tokens].tolist()


def load_tokenizer(folder: Path, span):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise CalibrationError(
            "E180", f"calibration needs the model's tokenizer, and none could be loaded from {folder}: "
            f"{str(exc).splitlines()[0]}", span,
            "put tokenizer files beside the model's config.json, or choose a split and router that "
            "need no calibration (kmeans or random; similarity or oracle)") from None


def token_windows(tokenizer, calibration: Calibration, span, model=None, seed: int = 0) -> torch.Tensor:
    """[windows, length] token ids of the calibration text (at most `calibration.tokens`)."""
    ids = calibration_ids(tokenizer, calibration, model, seed)
    if len(ids) < MIN_TOKENS:
        raise CalibrationError("E181", f"calibration text {describe(calibration)} has {len(ids)} tokens; at least "
                               f"{MIN_TOKENS} are needed", span, "give a longer text file")
    return windows(ids)


def ffn_inputs(model, windows: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """The input of each selected layer's FFN on every calibration token: {layer: [T, d]}."""
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    hooks = [layer_module(model, layer, "ffn.up").register_forward_pre_hook(
        lambda module, args, layer=layer: captured[layer].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for layer in layers]
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window.unsqueeze(0), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: torch.cat(parts) for layer, parts in captured.items()}


def dense_model(specs, get, folder: Path):
    """The HF model of `folder`'s config.json with tensors from `get(name)`, in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    state = {spec.name: get(spec.name).float() for spec in specs}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise WeightError(f"the model's tensors do not fit its config.json: "
                          f"{'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]}")
    return model
