"""grow methods on tiny random Llama and Mistral models: block_expand, stack (against
mergekit 0.1.5 passthrough), widen, upcycle, and identity verification."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import cfmlang
from cfmlang.diagnostics import CompileError
from cfmlang.architectures import describe
from cfmlang.ops.grow.shapes import depth_config, expanded_layers
from mergekit_oracle import run_mergekit, tensors
from models import tiny_model, tiny_tokenizer

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127], [3, 3, 3, 0, 64, 12, 90, 2]])


def program(zoo, body: str, output: str) -> str:
    models = "".join(f'model {name}:\n  source: hf "{path}"\n' for name, path in zoo.items())
    return models + body + f"output: {output}\n"


def logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        return model(IDS).logits


def max_diff(a, b) -> float:
    return float((logits(a) - logits(b)).abs().max())


# ---- block_expand ---------------------------------------------------------------------

def test_block_expand_every_inserts_identity_copies(tiny_zoo, tmp_path):
    body = "grow pro:\n  method: block_expand\n  from: llama_a\n  every: 2\n"
    result = cfmlang.compile(program(tiny_zoo, body, "pro"), tmp_path / "pro")
    out, original = tensors(tmp_path / "pro"), tensors(tiny_zoo["llama_a"])
    assert len(out) == len(original) + 2 * 9
    origin = {0: 0, 1: 1, 2: 1, 3: 2, 4: 3, 5: 3}       # a copy after layers 1 and 3
    for name, value in out.items():
        if ".layers." not in name:
            assert torch.equal(value, original[name])
            continue
        layer = int(name.split(".")[2])
        source = original[name.replace(f"layers.{layer}.", f"layers.{origin[layer]}.")]
        zeroed = layer in (2, 5) and ("o_proj" in name or "down_proj" in name)
        assert torch.equal(value, torch.zeros_like(source) if zeroed else source), name
    config = json.loads((tmp_path / "pro" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    node = result.manifest["nodes"]["pro"]
    assert node["new_layers"] == [2, 5] and result.manifest["new_layers"] == [2, 5]
    assert node["verify"]["max_abs_logit_diff"] == 0.0 and node["verify"]["tolerance"] == 1e-4
    assert max_diff(tmp_path / "pro", tiny_zoo["llama_a"]) == 0.0
    assert cfmlang.load(tmp_path / "pro").config.num_hidden_layers == 6


def test_block_expand_positions_on_mistral(tiny_zoo, tmp_path):
    body = "grow pro:\n  method: block_expand\n  from: mistral_a\n  positions: [3, 0]\n"
    result = cfmlang.compile(program(tiny_zoo, body, "pro"), tmp_path / "pro")
    assert result.manifest["nodes"]["pro"]["new_layers"] == [1, 5]
    assert [s["layer"] for s in result.manifest["nodes"]["pro"]["layers"]] == [0, 0, 1, 2, 3, 3]
    out = tensors(tmp_path / "pro")
    assert not out["model.layers.1.self_attn.o_proj.weight"].any()
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"],
                       out["model.layers.0.self_attn.q_proj.weight"])
    assert max_diff(tmp_path / "pro", tiny_zoo["mistral_a"]) == 0.0


def test_depth_config_moves_per_layer_lists():
    config = {"num_hidden_layers": 3, "layer_types": ["full", "sliding", "full"],
              "architectures": ["LlamaForCausalLM"], "hidden_size": 8}
    layout = describe({"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 8, "intermediate_size": 16,
                       "num_attention_heads": 2, "vocab_size": 32})
    out = depth_config({"m": config}, expanded_layers("m", 3, [1]), layout)
    assert out["num_hidden_layers"] == 4 and out["layer_types"] == ["full", "sliding", "sliding", "full"]
    assert out["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 3
    nested = depth_config({"m": {"model_type": "x", "text_config": config}}, expanded_layers("m", 3, [2]), layout)
    assert nested["text_config"]["layer_types"] == ["full", "sliding", "full", "full"]


def test_grown_layers_reach_a_dependent_update_through_the_ir(tiny_zoo):
    body = ("grow pro:\n  method: block_expand\n  from: llama_a\n  every: 2\n"
            "merge soup:\n  method: linear\n  inputs: {pro: {weight: 1.0}}\n")
    checked = cfmlang.check(program(tiny_zoo, body, "soup"))
    assert checked.node("pro").arch.new_layers == (2, 5)
    assert checked.node("pro").node_type == "model" and checked.node("pro").arch.num_layers == 6


# ---- stack ------------------------------------------------------------------------------

def test_stack_equals_mergekit_passthrough(tiny_zoo, tmp_path):
    body = ("grow deep:\n  method: stack\n  slices:\n"
            "    - {from: llama_a.layers[0:3], scale: 0.5}\n"
            "    - llama_b.layers[2]\n"
            "    - {from: llama_b.layers[1:4], scale: {o_proj: 0.0, down_proj: [0.25, 1.0], default: 1.0}}\n")
    result = cfmlang.compile(program(tiny_zoo, body, "deep"), tmp_path / "deep")
    a, b = str(tiny_zoo["llama_a"]), str(tiny_zoo["llama_b"])
    expected = run_mergekit({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 3], "parameters": {"scale": 0.5}}]},
        {"sources": [{"model": b, "layer_range": [2, 3]}]},
        {"sources": [{"model": b, "layer_range": [1, 4], "parameters": {"scale": [
            {"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": [0.25, 1.0]},
            {"value": 1.0}]}}]}]}, tmp_path / "mergekit")
    ours = tensors(tmp_path / "deep")
    assert sorted(ours) == sorted(expected)
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name
    assert json.loads((tmp_path / "deep" / "config.json").read_text())["num_hidden_layers"] == 7
    assert result.manifest["nodes"]["deep"]["verify"] == {"check": "none"}
    assert result.manifest["nodes"]["deep"]["inputs"] == ["llama_a", "llama_b"]
    assert cfmlang.load(tmp_path / "deep").config.num_hidden_layers == 7


def test_stack_dtype_casts_before_scale_and_sets_the_config(tiny_zoo, tmp_path):
    body = ("grow deep:\n  method: stack\n  dtype: bfloat16\n  slices:\n"
            "    - llama_a.layers[0:2]\n    - {from: llama_b.layers[2:4], scale: 0.3}\n")
    cfmlang.compile(program(tiny_zoo, body, "deep"), tmp_path / "deep")
    ours, b = tensors(tmp_path / "deep"), tensors(tiny_zoo["llama_b"])
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    name = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(ours[name], b[name].to(torch.bfloat16) * 0.3)
    assert not torch.equal(ours[name], (b[name] * 0.3).to(torch.bfloat16))   # the order is visible
    assert json.loads((tmp_path / "deep" / "config.json").read_text())["dtype"] == "bfloat16"
    assert cfmlang.check(program(tiny_zoo, body, "deep")).node("deep").arch.tensors[0].dtype == "BF16"


def test_verification_catches_a_changed_function(tiny_zoo, tmp_path):
    body = "grow deep:\n  method: stack\n  slices: [llama_a, llama_a.layers[3:4]]\n  verify: identity\n"
    with pytest.raises(CompileError) as info:
        cfmlang.compile(program(tiny_zoo, body, "deep"), tmp_path / "deep")
    (problem,) = info.value.diagnostics
    assert problem.code == "E110" and "max |Δlogit|" in problem.message and problem.span.line == 13
    assert not (tmp_path / "deep").exists() and list(tmp_path.iterdir()) == []


def test_stack_whose_new_blocks_are_zeroed_passes_verification(tiny_zoo, tmp_path):
    """LLaMA Pro written as passthrough slices: the same function, verified on request."""
    body = ("grow deep:\n  method: stack\n  verify: identity\n  slices:\n    - llama_a\n"
            "    - {from: llama_a.layers[3], scale: {o_proj: 0.0, down_proj: 0.0, default: 1.0}}\n")
    result = cfmlang.compile(program(tiny_zoo, body, "deep"), tmp_path / "deep")
    assert result.manifest["nodes"]["deep"]["verify"]["max_abs_logit_diff"] == 0.0


# ---- widen ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_widen_duplicate_splits_output_weights(tiny_zoo, tmp_path, arch):
    body = f"grow wide:\n  method: widen\n  from: {arch}_a\n  intermediate_size: 150\n"
    result = cfmlang.compile(program(tiny_zoo, body, "wide"), tmp_path / "wide")
    out, original = tensors(tmp_path / "wide"), tensors(tiny_zoo[f"{arch}_a"])
    gate, up, down = (out[f"model.layers.1.mlp.{m}.weight"] for m in ("gate_proj", "up_proj", "down_proj"))
    assert gate.shape == (150, 32) and up.shape == (150, 32) and down.shape == (32, 150)
    assert torch.equal(gate[:64], original["model.layers.1.mlp.gate_proj.weight"])
    sources = [next(k for k in range(64) if torch.equal(gate[j], gate[k])) for j in range(64, 150)]
    assert all(torch.equal(up[j], up[k]) for j, k in zip(range(64, 150), sources))
    copies = torch.bincount(torch.tensor(sources), minlength=64) + 1
    assert copies.max() == 3 and copies.min() >= 2          # 86 new neurons over 64 old ones
    summed = down[:, :64].clone().index_add_(1, torch.tensor(sources), down[:, 64:])
    torch.testing.assert_close(summed, original["model.layers.1.mlp.down_proj.weight"], rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["intermediate_size"] == 150
    assert result.manifest["nodes"]["wide"]["verify"]["max_abs_logit_diff"] <= 1e-5
    assert max_diff(tmp_path / "wide", tiny_zoo[f"{arch}_a"]) <= 1e-5


def test_widen_zero_init_adds_silent_neurons(tiny_zoo, tmp_path):
    body = "grow wide:\n  method: widen\n  from: llama_a\n  intermediate_size: 80\n  init: zero\n  seed: 7\n"
    cfmlang.compile(program(tiny_zoo, body, "wide"), tmp_path / "wide")
    out, original = tensors(tmp_path / "wide"), tensors(tiny_zoo["llama_a"])
    down = out["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(down[:, :64], original["model.layers.2.mlp.down_proj.weight"]) and not down[:, 64:].any()
    new_rows = out["model.layers.2.mlp.up_proj.weight"][64:]
    assert new_rows.std() > 0 and not any(torch.equal(r, o) for r in new_rows
                                          for o in original["model.layers.2.mlp.up_proj.weight"])
    assert max_diff(tmp_path / "wide", tiny_zoo["llama_a"]) == 0.0
    cfmlang.compile(program(tiny_zoo, body, "wide"), tmp_path / "again")
    assert (tmp_path / "wide" / "model.safetensors").read_bytes() == \
        (tmp_path / "again" / "model.safetensors").read_bytes()


# ---- upcycle ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,top_k", [("llama", 2), ("mistral", 1)])
def test_upcycle_is_mixtral_with_the_same_function(tiny_zoo, tmp_path, arch, top_k):
    body = f"grow moe:\n  method: upcycle\n  from: {arch}_a\n  experts: 4\n  top_k: {top_k}\n"
    result = cfmlang.compile(program(tiny_zoo, body, "moe"), tmp_path / "moe")
    out, original = tensors(tmp_path / "moe"), tensors(tiny_zoo[f"{arch}_a"])
    prefix = "model.layers.3.block_sparse_moe"
    for expert in range(4):
        for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            assert torch.equal(out[f"{prefix}.experts.{expert}.{ours}.weight"],
                               original[f"model.layers.3.mlp.{theirs}.weight"])
    router = out[f"{prefix}.gate.weight"]
    assert router.shape == (4, 32) and 0.01 < float(router.std()) < 0.03
    assert not any(".mlp." in name for name in out)
    model = cfmlang.load(tmp_path / "moe")
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == top_k
    assert result.manifest["nodes"]["moe"]["verify"]["max_abs_logit_diff"] <= 1e-5
    assert max_diff(tmp_path / "moe", tiny_zoo[f"{arch}_a"]) <= 1e-5


CHAIN = ("grow wide:\n  method: widen\n  from: llama_a\n  intermediate_size: 96\n"
         "grow moe:\n  method: upcycle\n  from: wide\n  experts: 2\n"
         "grow pro:\n  method: block_expand\n  from: moe\n  positions: [1]\n")


@pytest.mark.parametrize("use_cache", [True, False])
def test_grow_chain_verifies_every_node(tiny_zoo, tmp_path, use_cache):
    """Intermediate grown models are verified too: when written to the cache, or (pulled
    through without a cache) written to scratch space first."""
    result = cfmlang.compile(program(tiny_zoo, CHAIN, "pro"), tmp_path / "pro", use_cache=use_cache)
    nodes = result.manifest["nodes"]
    assert [nodes[n]["verify"]["reference"] for n in ("wide", "moe", "pro")] == ["llama_a", "wide", "moe"]
    assert all(nodes[n]["verify"]["max_abs_logit_diff"] <= 1e-5 for n in ("wide", "moe", "pro"))
    out = tensors(tmp_path / "pro")
    assert not out["model.layers.2.block_sparse_moe.experts.1.w2.weight"].any()
    assert out["model.layers.2.block_sparse_moe.experts.1.w1.weight"].shape == (96, 32)
    assert max_diff(tmp_path / "pro", tiny_zoo["llama_a"]) <= 1e-5


def test_a_cached_recompile_keeps_the_verification(tiny_zoo, tmp_path):
    first = cfmlang.compile(program(tiny_zoo, CHAIN, "pro"), tmp_path / "a")
    again = cfmlang.compile(program(tiny_zoo, CHAIN, "pro"), tmp_path / "b")
    assert again.stats == {} and again.plan.node("pro").status == "cached"
    for name in ("wide", "moe", "pro"):
        assert again.manifest["nodes"][name]["verify"] == first.manifest["nodes"][name]["verify"]
    assert again.manifest["new_layers"] == [2]


# ---- diagnostics that need a model the golden corpus lacks -----------------------------

def codes(text: str) -> list[str]:
    with pytest.raises(CompileError) as info:
        cfmlang.check(text)
    return [d.code for d in info.value.diagnostics]


def test_upcycle_refuses_biases(tmp_path):
    biased = tiny_model(tmp_path / "biased", seed=3, attention_bias=True)
    text = f'model m:\n  source: hf "{biased}"\ngrow moe:\n  method: upcycle\n  from: m\n  experts: 2\n'
    assert codes(text) == ["E113"]


def test_widen_and_upcycle_refuse_a_model_without_a_gated_mlp(tiny_zoo, tmp_path):
    from safetensors.torch import save_file
    import shutil

    folder = tmp_path / "nomlp"
    folder.mkdir()
    shutil.copy(tiny_zoo["llama_a"] / "config.json", folder)
    save_file({k: v for k, v in tensors(tiny_zoo["llama_a"]).items() if "layers.2.mlp.up_proj" not in k},
              folder / "model.safetensors", metadata={"format": "pt"})
    for body in ("method: widen\n  intermediate_size: 99", "method: upcycle\n  experts: 2",
                 "method: block_expand\n  positions: [1]"):
        text = f'model m:\n  source: hf "{folder}"\ngrow g:\n  {body}\n  from: m\n'
        if "block_expand" in body:
            cfmlang.check(text)      # block_expand only zeroes down_proj: it needs no up_proj
        else:
            assert codes(text) == ["E113"]


def test_finetuning_the_new_blocks_of_block_expand(tmp_path):
    """update finetune takes a grown model like any other: the new blocks learn, every
    original block stays bit-identical."""
    base = tiny_tokenizer(tiny_model(tmp_path / "tiny", seed=3))
    (tmp_path / "train.txt").write_text(("the sky of the sea is a poem and the night is a story " * 12).strip())
    text = (f'model tiny:\n  source: hf "{base}"\n'
            "grow pro:\n  method: block_expand\n  from: tiny\n  every: 2\n"
            "update tuned:\n  method: finetune\n  from: pro\n  train: new_blocks\n"
            f'  data: "{tmp_path / "train.txt"}"\n  steps: 8\n  lr: 0.01\n  max_length: 16\n'
            "output: tuned\n")
    result = cfmlang.compile(text, tmp_path / "tuned")
    assert cfmlang.check(text).node("pro").arch.new_layers == (2, 5)
    training = result.manifest["nodes"]["tuned"]
    assert training["loss_after"] < training["loss_before"]
    out, original = tensors(tmp_path / "tuned"), tensors(base)
    origin = {0: 0, 1: 1, 3: 2, 4: 3}
    for name, value in out.items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        if layer in (2, 5):
            continue
        source = name if layer is None else name.replace(f"layers.{layer}.", f"layers.{origin[layer]}.")
        assert torch.equal(value, original[source]), name
    assert out["model.layers.2.mlp.down_proj.weight"].any()       # a new block learnt
    assert result.manifest["nodes"]["tuned"]["train"] == ["model.layers.2.", "model.layers.5."]


def test_new_blocks_of_a_model_that_did_not_grow(tmp_path):
    base = tiny_tokenizer(tiny_model(tmp_path / "tiny", seed=3))
    (tmp_path / "train.txt").write_text("the sky of the sea is a poem")
    text = (f'model tiny:\n  source: hf "{base}"\n'
            f'update tuned:\n  method: finetune\n  from: tiny\n  train: new_blocks\n  data: "{tmp_path / "train.txt"}"\n')
    with pytest.raises(CompileError) as exc:
        cfmlang.check(text)
    (problem,) = exc.value.diagnostics
    assert problem.code == "E124" and "`tiny` has no new blocks" in problem.message
