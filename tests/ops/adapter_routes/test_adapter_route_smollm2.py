"""The SmolLM2 voices example end to end: two LoRA bricks trained from the project's own
data (examples/smol_french.brick, examples/smol_pirate.brick), routed by retrieval
(examples/smol_voices.brick), against each adapter fused alone (smol_pirate_fused.brick
and its French twin). Routing accuracy on held-out prompts is printed (run with -s)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import cfmlang
from cfmlang.cachedir import default_cache_dir
from cfmlang.runtime.adapter_mixture import prompt_embedding
from cfmlang.ops.lora.train import IGNORE, Sample, encode
from paths import REPO

EXAMPLES = REPO / "examples"
VOICES = ("french", "pirate")
TOL = 2e-4      # float32: (W + s·B@A) x against W x + s·B@(A x) over 30 layers; measured 8e-5


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """The examples compiled in a scratch copy of examples/ (their `../out` is scratch)."""
    root = tmp_path_factory.mktemp("voices")
    examples = root / "examples"
    shutil.copytree(EXAMPLES / "lora", examples / "lora")
    fused = (EXAMPLES / "smol_pirate_fused.brick").read_text()
    for voice in VOICES:
        shutil.copy(EXAMPLES / f"smol_{voice}.brick", examples)
        (examples / f"smol_{voice}_fused.brick").write_text(fused.replace("pirate", voice))
    shutil.copy(EXAMPLES / "smol_voices.brick", examples)
    for name in ("smol_french", "smol_pirate", "smol_voices", "smol_french_fused", "smol_pirate_fused"):
        cfmlang.compile(examples / f"{name}.brick", root / "out" / name, cache_dir=default_cache_dir())
    return root / "out"


def heldout() -> list[tuple[str, str]]:
    lines = (EXAMPLES / "lora" / "route_heldout.jsonl").read_text(encoding="utf-8").splitlines()
    return [(record["prompt"], record["adapter"]) for record in map(json.loads, lines)]


def test_retrieval_routes_each_voice_to_its_adapter_and_equals_it_fused(out):
    manifest = json.loads((out / "smol_voices" / "cfm.json").read_text())
    assert manifest["kind"] == "adapter-routed" and manifest["routing"]["adapters"] == list(VOICES)
    routed = cfmlang.load(out / "smol_voices")
    tokenizer = AutoTokenizer.from_pretrained(out / "smol_voices")
    fused = {v: AutoModelForCausalLM.from_pretrained(out / f"smol_{v}_fused").eval() for v in VOICES}
    base = AutoModelForCausalLM.from_pretrained(out / "smol_voices").eval()   # the route's base, no adapter
    prompts = heldout()
    hits = {voice: 0 for voice in VOICES}
    worst = 0.0
    with torch.inference_mode():
        for prompt, voice in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            (chosen,), = routed.chosen(ids)
            hits[voice] += chosen == voice
            logits = routed(ids).logits
            worst = max(worst, float((logits - fused[chosen](input_ids=ids).logits).abs().max()))
            other = next(v for v in VOICES if v != chosen)
            assert (logits - fused[other](input_ids=ids).logits).abs().max() > 1e-2, prompt
            assert (logits - base(input_ids=ids).logits).abs().max() > 1e-2, prompt
    per_voice = {v: hits[v] / sum(1 for _, w in prompts if w == v) for v in VOICES}
    accuracy = sum(hits.values()) / len(prompts)
    print(f"\nrouting accuracy on {len(prompts)} held-out prompts: {accuracy:.0%} {per_voice}; "
          f"max |routed - fused| logit difference {worst:.2e}")
    assert accuracy >= 0.9 and min(per_voice.values()) >= 0.8, per_voice
    assert worst < TOL


def test_a_four_layer_embedder_routes_the_voices_too(out):
    """`embed_layers: 4` (the cheap embedder of the README's latency table): keys and
    queries from the first 4 of SmolLM2's 30 layers still route the held-out prompts."""
    routed = cfmlang.load(out / "smol_voices")
    tokenizer = AutoTokenizer.from_pretrained(out / "smol_voices")
    samples = cfmlang.check(out.parent / "examples" / "smol_voices.brick").node("voice").samples
    routed.coefficients.active = False            # keys are embedded with every adapter off, as compiled
    keys = torch.stack([prompt_embedding(routed.model, tokenizer, list(s), 4) for s in samples])
    routed.coefficients.active = True
    routed.embeddings, routed.embed_layers = torch.nn.functional.normalize(keys, dim=-1), 4
    with torch.inference_mode():
        hits = sum(routed.chosen(tokenizer(p, return_tensors="pt")["input_ids"]) == [[v]] for p, v in heldout())
    print(f"\nrouting accuracy with a 4-layer embedder: {hits}/{len(heldout())}")
    assert hits >= 0.9 * len(heldout())


def test_training_prompts_can_leave_out_the_default_system_prompt(out):
    """`system: ""` (the examples' setting): SmolLM2's default system message is not in
    the training prompt, which gets shorter; the learned answer is the same."""
    tokenizer = AutoTokenizer.from_pretrained(out / "smol_voices")
    sample = Sample("Le ciel est bleu.", "What color is the sky?")
    default_ids, default_labels = encode(tokenizer, sample, 128)
    ids, labels = encode(tokenizer, sample, 128, system="")
    assert "SmolLM" in tokenizer.decode(default_ids) and "SmolLM" not in tokenizer.decode(ids)
    assert len(ids) < len(default_ids) - 10
    answer = [t for t in labels if t != IGNORE]
    assert answer == [t for t in default_labels if t != IGNORE]
    assert tokenizer.decode(answer).startswith("Le ciel est bleu.")
    trained = json.loads((out / "smol_french" / "cfm.json").read_text())
    assert trained["nodes"]["french"]["system"] == ""
