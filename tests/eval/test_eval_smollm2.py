"""`cfmc eval` on the real SmolLM2-135M-Instruct: perplexity against a hand-written
reference, and an lm-eval local task against the built-in scorer."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import cfmlang
from cfmlang.cachedir import default_cache_dir
from cfmlang.cli import main
from cfmlang.eval import Settings, evaluate
from paths import REPO

TEXT = ("The baker rose before dawn, mixed flour, water and salt, and left the dough to rise "
        "near the warm oven while the village slept.")


@pytest.fixture(scope="module")
def smol_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol_eval") / "artifact"
    cfmlang.compile(REPO / "examples" / "smol.brick", out, cache_dir=default_cache_dir())
    return out


def test_cfmc_eval_perplexity_equals_the_reference_on_smollm2(smol_artifact, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tmp_path / "baker.txt"
    text.write_text(TEXT)
    assert main(["eval", str(smol_artifact), "--task", str(text), "--format", "json", "-q"]) == 0
    metrics = json.loads(capsys.readouterr().out)["tasks"][0]["metrics"]
    model = AutoModelForCausalLM.from_pretrained(smol_artifact, dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(smol_artifact)(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()      # mean NLL of tokens 2..n given all before
    assert metrics["tokens"] == ids.shape[1] - 1
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert 1 < metrics["perplexity"] < 100              # real English to a real model


def test_lm_eval_local_task_equals_the_builtin_accuracy_on_smollm2(smol_artifact, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(smol_artifact, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smol_artifact)
    result = evaluate(model, tokenizer, ["facts", "facts_harness"], Settings(limit=5, batch_size=10))
    builtin, harness = result.tasks
    assert harness.items == builtin.items == 5
    assert harness.metrics["acc"] == builtin.metrics["acc"] and builtin.metrics["acc"] >= 0.4
    assert harness.metrics["acc_norm"] == builtin.metrics["acc_norm"]
    for ours, theirs in zip(builtin.details, sorted(harness.details, key=lambda d: d["doc_id"])):
        assert theirs["loglikelihoods"] == pytest.approx(ours["loglikelihoods"], abs=1e-3)


def test_the_unedited_smollm2_knows_the_held_out_counterfacts(smol_artifact, capsys):
    """The shipped held-out set was filtered on this model: unedited, it prefers every
    true answer (efficacy 0, neighbourhood 1) and writes fluent text."""
    assert main(["eval", str(smol_artifact), "--task", "counterfact_heldout", "--limit", "4", "--format", "json",
                 "-q"]) == 0
    metrics = json.loads(capsys.readouterr().out)["tasks"][0]["metrics"]
    assert metrics["efficacy"] == 0.0 and metrics["greedy_efficacy"] == 0.0
    assert metrics["neighbourhood"] == 1.0 and metrics["score"] == 0.0
    assert 4.0 < metrics["fluency"] < 7.0        # ROME reports about 6.2 bits for GPT-2 XL's text
