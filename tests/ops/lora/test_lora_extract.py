"""LoRA extraction bricks: SVD of (tuned - base), written as a PEFT adapter."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cfmlang
from cfmlang.diagnostics import CompileError
from cfmlang.ops.lora.factors import LINEAR_MODULES

TRUE_RANK = 3


@pytest.fixture(scope="module")
def base_and_tuned(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny base and a 'fine-tune' whose linear weights differ by an exact rank-3 delta
    and whose final norm also changed (which no adapter can carry)."""
    from models import tiny_model

    root = tmp_path_factory.mktemp("lora")
    base = tiny_model(root / "base", seed=7)
    tuned = root / "tuned"
    shutil.copytree(base, tuned)
    weights = load_file(base / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, value in weights.items():
        if name.split(".")[-2] in LINEAR_MODULES:
            out, inp = value.shape
            left = torch.randn(out, TRUE_RANK, generator=generator) * 0.1
            weights[name] = value + left @ torch.randn(TRUE_RANK, inp, generator=generator) * 0.1
    weights["model.norm.weight"] = weights["model.norm.weight"] + 0.01
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    return base, tuned


PROGRAM = """
model base:
  source: hf "{base}"
model tuned:
  source: hf "{tuned}"
brick delta:
  kind: lora
  extract:
    from: tuned
    base: base
    rank: {rank}
    threshold: {threshold}
output: delta
"""


def test_extracted_adapter_reproduces_the_fine_tune(base_and_tuned, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tuned = base_and_tuned
    result = cfmlang.compile(PROGRAM.format(base=base, tuned=tuned, rank=8, threshold=1e-4), tmp_path / "a")
    adapter = result.manifest["adapter"]
    assert set(adapter["ranks"].values()) == {TRUE_RANK}          # the threshold found the true rank
    assert max(adapter["relative_error"].values()) < 1e-5
    assert adapter["not_captured"] == ["model.norm.weight"]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["rank_pattern"].values()) == {TRUE_RANK}

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "a")
    merged = peft_model.merge_and_unload().state_dict()
    tuned_weights = load_file(tuned / "model.safetensors")
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"]:
        torch.testing.assert_close(merged[name], tuned_weights[name], atol=1e-6, rtol=1e-5)
    loaded = result.module                                      # cfmlang.load -> PeftModel
    ids = torch.tensor([[1, 5, 9, 2]])
    tuned_model = AutoModelForCausalLM.from_pretrained(tuned)
    tuned_model.model.norm.weight.data = loaded.base_model.model.model.norm.weight.data.clone()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, tuned_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_low_rank_cap_reports_the_error(base_and_tuned, tmp_path):
    base, tuned = base_and_tuned
    result = cfmlang.compile(PROGRAM.format(base=base, tuned=tuned, rank=1, threshold=0.0), tmp_path / "b")
    errors = result.manifest["adapter"]["relative_error"]
    assert set(result.manifest["adapter"]["ranks"].values()) == {1}
    assert len(errors) == 4 * len(LINEAR_MODULES)
    assert all(0.2 < e < 1.0 for e in errors.values())           # rank 1 of a rank-3 delta
    tensors = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (1, 32)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (64, 1)


def test_lora_brick_diagnostics(base_and_tuned):
    base, tuned = base_and_tuned
    bad = PROGRAM.format(base=base, tuned=tuned, rank=0, threshold=1.5).replace("from: tuned", "from: tund")
    with pytest.raises(CompileError) as info:
        cfmlang.check(bad)
    got = sorted((d.code, d.span.line) for d in info.value.diagnostics)
    assert got == [("E020", 9), ("E032", 11), ("E032", 12)]
    no_extract = "brick d:\n  kind: lora\n"
    with pytest.raises(CompileError) as info:
        cfmlang.check(no_extract)
    assert [d.code for d in info.value.diagnostics] == ["E157"]
