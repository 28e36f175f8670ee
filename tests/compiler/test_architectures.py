"""cfmlang.architectures against real (tiny, random) transformers models of each family:
the description must name the tensors that the instantiated model and its saved
checkpoint really hold."""
from __future__ import annotations

import re

import pytest
import torch
import transformers
from safetensors import safe_open

from cfmlang.architectures import ArchitectureError, Architecture, describe, gguf_tensor_name, num_layers_key
from families import CASES, FALCON, FUSED_ATTN, GPT, LAYERS, NORMS, PLAIN, SMALL, Case

def build(case: Case, tmp_path):
    """(config dict, model on CPU, names in memory, names in the saved checkpoint)."""
    config_class = getattr(transformers, case.config, None)
    if config_class is None:
        pytest.skip(f"the installed transformers has no {case.config}")
    config = config_class(**case.kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    return config.to_dict(), model, set(model.state_dict()), saved


def check_layers(arch: Architecture, names: set, prefix: str) -> None:
    """Every tensor of layer i has layer_of i and moves to every other layer."""
    assert arch.layers == prefix
    assert arch.num_layers == LAYERS
    per_layer = [{n for n in names if n.startswith(f"{prefix}.{i}.")} for i in range(LAYERS)]
    assert all(per_layer) and len({len(group) for group in per_layer}) == 1
    for i, group in enumerate(per_layer):
        for name in group:
            assert arch.layer_of(name) == i, name
            assert all(arch.renumbered(name, j) in per_layer[j] for j in range(LAYERS)), name
            assert arch.role_of(name) is not None or any(name.startswith(f"{prefix}.{i}.{u}.")
                                                        for u in arch.unclassified), name
    for name in names - set().union(*per_layer):
        assert arch.layer_of(name) is None, name


def check_roles(arch: Architecture, case: Case, names: set) -> None:
    assert {role for role, _ in arch.members} == case.roles
    for role in case.roles:
        for layer in range(LAYERS):
            path = arch.module(layer, role)
            assert any(n.startswith(path + ".") for n in names), (role, path)
            assert arch.role_of(next(n for n in sorted(names) if n.startswith(path + "."))) == role


@pytest.mark.parametrize("case", CASES, ids=[c.family for c in CASES])
def test_family(case: Case, tmp_path):
    config, model, in_memory, saved = build(case, tmp_path)
    arch, live = describe(config), describe(config, layout="module")
    assert arch.model_type == case.family
    assert (arch.hidden_size, arch.vocab_size, arch.intermediate_size) == (32, 128, case.width)
    assert config[arch.keys.num_layers] == LAYERS and config[arch.keys.hidden_size] == 32
    assert config[arch.keys.vocab_size] == 128
    assert config[arch.keys.intermediate_size] in (case.width, None)     # gpt2's n_inner None means 4 * n_embd
    assert arch.parallel is case.parallel
    assert {r: m for r, m in arch.members if r in case.members} == case.members
    check_layers(arch, saved, case.layers)
    check_roles(arch, case, saved)
    check_layers(live, in_memory, live.layers)
    check_roles(live, case, in_memory)

    embed, final_norm, lm_head = case.top
    assert (arch.embed, arch.final_norm, arch.lm_head) == case.top
    assert embed + ".weight" in saved and (final_norm is None or final_norm + ".weight" in saved)
    tied = model.get_submodule(live.lm_head).weight.data_ptr() == model.get_submodule(live.embed).weight.data_ptr()
    assert arch.tied is tied and live.tied is tied
    assert (lm_head + ".weight" in saved) is not tied and live.lm_head + ".weight" in in_memory
    assert arch.role_of(embed + ".weight") == "embed" and arch.role_of(lm_head + ".weight") == "lm_head"
    assert final_norm is None or arch.role_of(final_norm + ".weight") == "final_norm"


def test_gpt2_details(tmp_path):
    arch = describe(transformers.GPT2Config(**GPT).to_dict())
    assert arch.keys.num_layers == "n_layer" and arch.keys.hidden_size == "n_embd"
    assert arch.keys.intermediate_size == "n_inner" and arch.position_embed == "transformer.wpe"
    assert arch.role_of("transformer.wpe.weight") == "position_embed"
    assert arch.role_of("transformer.h.2.mlp.c_proj.bias") == "ffn.down"
    assert arch.role_of("transformer.h.2.attn.c_proj.weight") == "attn.o"
    assert arch.module(1, "attn.qkv") == "transformer.h.1.attn.c_attn"
    assert not arch.gated_ffn
    with pytest.raises(ArchitectureError) as caught:
        arch.require(["ffn.up", "ffn.gate"], "grow ffn")
    assert "gpt2" in str(caught.value) and "ffn.gate" in str(caught.value) and "grow ffn" in str(caught.value)
    assert caught.value.code == "E056" and caught.value.help
    with pytest.raises(ArchitectureError, match="ffn.gate"):
        arch.module(0, "ffn.gate")


@pytest.mark.parametrize("case", CASES, ids=[c.family for c in CASES])
def test_require_names_family_and_role(case: Case):
    config_class = getattr(transformers, case.config, None)
    if config_class is None:
        pytest.skip(f"the installed transformers has no {case.config}")
    arch = describe(config_class(**case.kwargs).to_dict())
    lacking = next(r for r in ("attn.qkv", "attn.q", "ffn.gate_up", "ffn.gate", "ffn.experts") if r not in case.roles)
    arch.require(sorted(case.roles), "everything it has")
    with pytest.raises(ArchitectureError) as caught:
        arch.require([lacking], "an edit")
    assert case.family in str(caught.value) and lacking in str(caught.value)


def test_llama_roles_and_gguf_names():
    arch = describe(transformers.LlamaConfig(**SMALL).to_dict())
    assert arch.gated_ffn and not arch.tied
    assert arch.role_of("model.layers.2.self_attn.o_proj.weight") == "attn.o"
    assert arch.role_of("model.layers.0.post_attention_layernorm.weight") == "norm.ffn"
    assert arch.role_of("model.norm.weight") == "final_norm" and arch.role_of("rotary.inv_freq") is None
    assert arch.layer_of("model.layers.12.mlp.up_proj.weight") == 12 and arch.layer_of("model.norm.weight") is None
    assert arch.renumbered("model.layers.0.mlp.up_proj.weight", 7) == "model.layers.7.mlp.up_proj.weight"
    expected = {"blk.3.attn_q.weight": "model.layers.3.self_attn.q_proj.weight",
                "blk.3.attn_k.weight": "model.layers.3.self_attn.k_proj.weight",
                "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
                "blk.1.attn_output.weight": "model.layers.1.self_attn.o_proj.weight",
                "blk.2.ffn_gate.weight": "model.layers.2.mlp.gate_proj.weight",
                "blk.2.ffn_up.weight": "model.layers.2.mlp.up_proj.weight",
                "blk.2.ffn_down.weight": "model.layers.2.mlp.down_proj.weight",
                "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
                "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
                "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight", "rope_freqs.weight": None, "blk.0.attn_qkv.weight": None,
                "blk.0.ffn_gate_exps.weight": None}
    assert {name: gguf_tensor_name(arch, name) for name in expected} == expected
    gpt2 = describe(transformers.GPT2Config(**GPT).to_dict())
    assert gguf_tensor_name(gpt2, "blk.1.attn_qkv.bias") == "transformer.h.1.attn.c_attn.bias"


def test_layouts_of_mixtral_differ_in_experts():
    config = transformers.MixtralConfig(**SMALL, num_local_experts=4).to_dict()
    disk, live = describe(config), describe(config, layout="module")
    assert disk.member("ffn.experts") == "block_sparse_moe.experts" and live.member("ffn.experts") == "mlp.experts"
    assert disk.role_of("model.layers.1.block_sparse_moe.experts.3.w2.weight") == "ffn.experts"
    assert live.role_of("model.layers.1.mlp.experts.gate_up_proj") == "ffn.experts"
    assert disk.intermediate_size == live.intermediate_size == 64 and not disk.gated_ffn
    assert describe(config) is disk      # cached


def test_falcon_new_decoder_has_two_norms(tmp_path):
    case = Case("falcon", "FalconConfig", {**FALCON, "new_decoder_architecture": True, "num_kv_heads": 2},
                FUSED_ATTN | PLAIN | NORMS, {"norm.attn": "ln_attn", "norm.ffn": "ln_mlp"}, layers="transformer.h")
    config, _, _, saved = build(case, tmp_path)
    arch = describe(config)
    assert {r: m for r, m in arch.members if r.startswith("norm")} == case.members and arch.parallel
    check_layers(arch, saved, "transformer.h")
    check_roles(arch, case, saved)


def test_gemma3_multimodal_describes_its_text_decoder(tmp_path):
    if getattr(transformers, "Gemma3Config", None) is None:
        pytest.skip("the installed transformers has no Gemma3Config")
    config = transformers.Gemma3Config(
        text_config={**SMALL, "head_dim": 8}, mm_tokens_per_image=4,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                           image_size=32, patch_size=8))
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {name for name in f.keys() if "vision" not in name}
    arch, live = describe(config.to_dict()), describe(config.to_dict(), layout="module")
    assert arch.model_type == "gemma3" and arch.keys.section == "text_config" and arch.tied
    assert num_layers_key(config.to_dict()) == "num_hidden_layers"
    case = CASES[[c.family for c in CASES].index("gemma3_text")]
    check_layers(arch, saved, arch.layers)
    check_roles(arch, case, saved)
    check_layers(live, set(model.state_dict()) - {n for n in model.state_dict() if "vision" in n}, live.layers)
    assert arch.layers.endswith("model.layers") and live.layers == "model.language_model.layers"
    assert arch.embed + ".weight" in saved and arch.final_norm + ".weight" in saved


def test_unknown_model_type_is_named():
    with pytest.raises(ArchitectureError) as caught:
        describe({"model_type": "lama", "num_hidden_layers": 2})
    assert "`lama`" in str(caught.value) and "llama" in caught.value.help and caught.value.code == "E056"
    with pytest.raises(ArchitectureError, match="model_type"):
        describe({"num_hidden_layers": 2})


def test_missing_layer_count_names_the_keys():
    config = transformers.LlamaConfig(**SMALL).to_dict()
    del config["num_hidden_layers"]
    with pytest.raises(ArchitectureError, match=re.escape("`num_hidden_layers`")):
        describe(config)
    gpt2 = transformers.GPT2Config(**GPT).to_dict()
    assert num_layers_key(gpt2) == "n_layer"
    del gpt2["n_layer"]
    with pytest.raises(ArchitectureError, match="`n_layer`") as caught:
        num_layers_key(gpt2)
    assert "gpt2" in str(caught.value)


def test_config_transformers_cannot_build_is_an_architecture_error():
    with pytest.raises(ArchitectureError, match="t5"):
        describe(transformers.T5Config(num_layers=2).to_dict())


def test_descriptions_are_stored_and_a_damaged_entry_is_described_again(tmp_path, monkeypatch):
    """A new process reads a stored description instead of importing transformers'
    classes (seconds); what it reads equals what it would build."""
    from cfmlang import architectures

    monkeypatch.setenv("CFM_CACHE_DIR", str(tmp_path))
    config = {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 64}
    text = architectures.json.dumps(config, sort_keys=True, default=str)
    built = architectures._describe(text, "checkpoint")
    architectures._described.cache_clear()
    assert architectures._described(text, "checkpoint") == built          # built, then stored
    (stored,) = (tmp_path / "architectures").glob("*.json")
    architectures._described.cache_clear()
    assert architectures._described(text, "checkpoint") == built          # read back
    stored.write_text("{not json")
    architectures._described.cache_clear()
    assert architectures._described(text, "checkpoint") == built          # damaged: described again
    assert architectures._read_stored(stored) == built


@pytest.mark.parametrize("case", CASES, ids=[c.family for c in CASES])
def test_head_logits_are_the_models_own(case: Case):
    """What edits compute on a few positions is what the family's forward computes."""
    from cfmlang.architectures import head_logits

    config_class = getattr(transformers, case.config, None)
    if config_class is None:
        pytest.skip(f"the installed transformers has no {case.config}")
    extra = {"logit_scale": 0.5} if case.family == "cohere" else {"logits_scaling": 4.0} \
        if case.family == "granite" else {"final_logit_softcapping": 3.0} if case.family in ("gemma2", "gemma3_text") else {}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**case.kwargs, **extra)).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        ours = head_logits(model, model.base_model(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(ours, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
