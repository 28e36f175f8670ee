"""Linear and task-arithmetic merges: against the formulas and against mergekit 0.1.5."""
from __future__ import annotations

import json

import pytest
import torch

import cfmlang
from models import layer_index
from mergekit_oracle import run_mergekit, tensors

NUM_LAYERS = 4


def gradient(values, layer):
    """mergekit's interpolation of a gradient list at layer `layer` (t = 0 off-layer)."""
    if not isinstance(values, list):
        return values
    t = 0.0 if layer is None else layer / (NUM_LAYERS - 1)
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    return (1 - (scaled - low)) * values[low] + (scaled - low) * values[high]


LINEAR = """
model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
merge mix:
  method: linear
  inputs:
    a: {{weight: 0.3}}
    b: {{weight: [0.9, 0.1]}}
output: mix
"""


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_linear_merge_matches_formula_and_mergekit(tiny_zoo, tmp_path, arch):
    a, b = tiny_zoo[f"{arch}_a"], tiny_zoo[f"{arch}_b"]
    result = cfmlang.compile(LINEAR.format(a=a, b=b), tmp_path / "ours")
    ours, ta, tb = tensors(tmp_path / "ours"), tensors(a), tensors(b)
    assert set(ours) == set(ta)
    for name, value in ours.items():
        wa, wb = 0.3, gradient([0.9, 0.1], layer_index(name))
        expected = (ta[name] * wa + tb[name] * wb) / (wa + wb)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    layer0 = ours["model.layers.0.mlp.up_proj.weight"]
    layer3 = ours["model.layers.3.mlp.up_proj.weight"]
    assert not torch.allclose(layer0, (ta["model.layers.0.mlp.up_proj.weight"] + tb["model.layers.0.mlp.up_proj.weight"]) / 2)
    assert layer3.shape == layer0.shape
    theirs = run_mergekit({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(a), "parameters": {"weight": 0.3}},
        {"model": str(b), "parameters": {"weight": [0.9, 0.1]}}]}, tmp_path / "mk")
    assert set(theirs) == set(ours)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert result.stats["mix"] == len(ours)


TASK = """
model base:
  source: hf "{a}"
model b:
  source: hf "{b}"
model c:
  source: hf "{c}"
merge ta:
  method: task_arithmetic
  base: base
  lambda: 0.8
  normalize: {normalize}
  inputs:
    b: {{weight: [1.0, 0.2, 0.5]}}
    c: {{weight: 0.4}}
  dtype: float32
output: ta
"""


@pytest.mark.parametrize("arch,normalize", [("llama", "false"), ("mistral", "true")])
def test_task_arithmetic_matches_formula_and_mergekit(tiny_zoo, tmp_path, arch, normalize):
    a, b, c = (tiny_zoo[f"{arch}_{n}"] for n in "abc")
    cfmlang.compile(TASK.format(a=a, b=b, c=c, normalize=normalize), tmp_path / "ours")
    ours, ta, tb, tc = (tensors(p) for p in (tmp_path / "ours", a, b, c))
    for name, value in ours.items():
        wb, wc = gradient([1.0, 0.2, 0.5], layer_index(name)), 0.4
        delta = wb * (tb[name] - ta[name]) + wc * (tc[name] - ta[name])
        if normalize == "true":
            delta = delta / (wb + wc)
        torch.testing.assert_close(value, ta[name] + 0.8 * delta, rtol=1e-5, atol=1e-6)
    theirs = run_mergekit({"merge_method": "task_arithmetic", "base_model": str(a), "dtype": "float32",
                           "parameters": {"lambda": 0.8, "normalize": normalize == "true"},
                           "models": [{"model": str(b), "parameters": {"weight": [1.0, 0.2, 0.5]}},
                                      {"model": str(c), "parameters": {"weight": 0.4}}]}, tmp_path / "mk")
    assert set(theirs) == set(ours)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_row_blocks_give_the_same_bytes_as_whole_tensors(tiny_zoo, tmp_path):
    a, b = tiny_zoo["mistral_a"], tiny_zoo["mistral_b"]
    cfmlang.compile(LINEAR.format(a=a, b=b), tmp_path / "whole")
    cfmlang.compile(LINEAR.format(a=a, b=b), tmp_path / "blocks", chunk_bytes=300)
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (tmp_path / "blocks" / "model.safetensors").read_bytes() == whole


def test_merge_of_a_merge_streams_through_both(tiny_zoo, tmp_path):
    a, b, c = (tiny_zoo[f"llama_{n}"] for n in "abc")
    text = f"""
model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
model c:
  source: hf "{c}"
merge ab:
  method: linear
  inputs: {{a: {{weight: 1}}, b: {{weight: 1}}}}
merge abc:
  method: linear
  weight: 1.0          # a node-level default for every input
  inputs: [ab, c]
output: abc
"""
    result = cfmlang.compile(text, tmp_path / "out")
    ours, ta, tb, tc = (tensors(p) for p in (tmp_path / "out", a, b, c))
    for name, value in ours.items():
        torch.testing.assert_close(value, ((ta[name] + tb[name]) / 2 + tc[name]) / 2)
    assert result.manifest["graph"]["edges"] == [["a", "ab"], ["ab", "abc"], ["b", "ab"], ["c", "abc"]]


def test_bf16_inputs_keep_their_dtype_and_config(tmp_path):
    from models import tiny_model

    a = tiny_model(tmp_path / "a", 1, dtype=torch.bfloat16)
    b = tiny_model(tmp_path / "b", 2, dtype=torch.bfloat16)
    cfmlang.compile(LINEAR.format(a=a, b=b), tmp_path / "out")
    out = tensors(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == NUM_LAYERS


def test_output_dtype_float16_and_hf_loadable(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = tiny_zoo["llama_a"], tiny_zoo["llama_b"]
    text = LINEAR.format(a=a, b=b).replace("output: mix", "dtype: float16\noutput: mix")
    cfmlang.compile(text, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.float16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    logits = model.float()(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_sharded_output_and_sharded_input(tiny_zoo, tmp_path):
    a, b = tiny_zoo["llama_a"], tiny_zoo["llama_b"]
    cfmlang.compile(LINEAR.format(a=a, b=b), tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    # the sharded output is itself a valid input
    text = f'model s:\n  source: hf "{tmp_path / "sharded"}"\nmodel b:\n  source: hf "{b}"\n' \
           "merge m:\n  method: linear\n  inputs: {s: {weight: 1}, b: {weight: 0}}\noutput: m\n"
    cfmlang.compile(text, tmp_path / "again")
    first, again = tensors(tmp_path / "sharded"), tensors(tmp_path / "again")
    assert all(torch.equal(first[n], again[n]) for n in first)


FILTERED = """
model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
merge mix:
  method: linear
  weight: {{self_attn: 0.3, mlp: [0.1, 0.9], default: 0.5}}
  inputs:
    a: null
    b: {{weight: {{up_proj: 2.0, default: [1.0, 0.0]}}}}
output: mix
"""


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_tensor_name_filters_match_mergekit(tiny_zoo, tmp_path, arch):
    a, b = tiny_zoo[f"{arch}_a"], tiny_zoo[f"{arch}_b"]
    cfmlang.compile(FILTERED.format(a=a, b=b), tmp_path / "ours")
    ours, ta, tb = tensors(tmp_path / "ours"), tensors(a), tensors(b)
    name = "model.layers.1.mlp.up_proj.weight"
    wa = gradient([0.1, 0.9], 1)
    torch.testing.assert_close(ours[name], (wa * ta[name] + 2.0 * tb[name]) / (wa + 2.0))
    theirs = run_mergekit({"merge_method": "linear", "dtype": "float32",
                           "parameters": {"weight": [{"filter": "self_attn", "value": 0.3},
                                                     {"filter": "mlp", "value": [0.1, 0.9]},
                                                     {"value": 0.5}]},
                           "models": [{"model": str(a)},
                                      {"model": str(b), "parameters": {"weight": [
                                          {"filter": "up_proj", "value": 2.0},
                                          {"value": [1.0, 0.0]}]}}]}, tmp_path / "mk")
    assert set(theirs) == set(ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_filter_diagnostics(tiny_zoo):
    from cfmlang.diagnostics import CompileError

    a, b = tiny_zoo["llama_a"], tiny_zoo["llama_b"]
    text = FILTERED.format(a=a, b=b).replace("self_attn: 0.3", "self_atn: 0.3")
    program = cfmlang.check(text)
    (warn,) = program.warnings
    assert warn.code == "W003" and "`self_atn`" in warn.message and warn.help == ("did you mean `self_attn`?",)
    no_default = FILTERED.format(a=a, b=b).replace(", default: 0.5", "")
    with pytest.raises(CompileError) as info:
        cfmlang.check(no_default)
    (problem,) = info.value.diagnostics
    assert problem.code == "E014" and "no value for tensor `lm_head.weight`" in problem.message
    assert problem.span.line == 8


def test_input_count_is_checked(tiny_zoo):
    from cfmlang.diagnostics import CompileError

    text = f'model a:\n  source: hf "{tiny_zoo["llama_a"]}"\n' \
           "merge m:\n  method: task_arithmetic\n  base: a\n  inputs: [a]\n  weight: 1\noutput: m\n"
    with pytest.raises(CompileError) as info:
        cfmlang.check(text)
    (problem,) = info.value.diagnostics
    assert problem.code == "E034" and problem.span.line == 6
    assert "takes at least 1 input besides the base, got 0" in problem.message
