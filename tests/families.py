"""Tiny configurations of every decoder-only family the installed transformers has among
those cfmlang describes, shared by the architecture and the per-family operation tests.
Each `Case` states what the family's layers hold, written here by hand from the
family's modeling code (an oracle independent of cfmlang.architectures)."""
from __future__ import annotations

from dataclasses import dataclass, field

LAYERS = 3
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, **TOKENS)
GPT = dict(n_layer=LAYERS, n_embd=32, n_head=4, vocab_size=128, bos_token_id=1, eos_token_id=2)
FALCON = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=128, **TOKENS)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)

ATTN = {"attn.q", "attn.k", "attn.v", "attn.o"}
QK_NORM = {"attn.q_norm", "attn.k_norm"}
GATED = {"ffn.gate", "ffn.up", "ffn.down"}
PLAIN = {"ffn.up", "ffn.down"}
NORMS = {"norm.attn", "norm.ffn"}
SANDWICH = {"norm.attn", "norm.attn_out", "norm.ffn", "norm.ffn_out"}
ROUTED = {"ffn.router", "ffn.experts"}
LLAMA = ATTN | GATED | NORMS
FUSED_ATTN = {"attn.qkv", "attn.o"}
MODEL = ("model.embed_tokens", "model.norm", "lm_head")
TRANSFORMER = ("transformer.wte", "transformer.ln_f", "lm_head")


@dataclass
class Case:
    family: str
    config: str                    # the transformers config class
    kwargs: dict
    roles: set
    members: dict = field(default_factory=dict)   # role -> member, checkpoint layout
    layers: str = "model.layers"
    top: tuple = MODEL             # embed, final_norm, lm_head
    width: int = 64
    parallel: bool = False
    lora: tuple = ("q_proj", "v_proj")   # leaf names of the attention inputs an adapter targets


CASES = [
    Case("llama", "LlamaConfig", SMALL, LLAMA, {"attn.o": "self_attn.o_proj", "ffn.down": "mlp.down_proj",
                                               "norm.attn": "input_layernorm", "norm.ffn": "post_attention_layernorm"}),
    Case("mistral", "MistralConfig", SMALL, LLAMA),
    Case("mixtral", "MixtralConfig", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
         ATTN | ROUTED | NORMS, {"ffn.experts": "block_sparse_moe.experts", "ffn.router": "block_sparse_moe.gate"}),
    Case("qwen2", "Qwen2Config", SMALL, LLAMA),
    Case("qwen2_moe", "Qwen2MoeConfig", {**SMALL, **MOE, "num_experts": 4, "shared_expert_intermediate_size": 48},
         ATTN | ROUTED | NORMS | {"ffn.shared_expert"}, {"ffn.shared_expert": "mlp.shared_expert"}, width=16),
    Case("qwen3", "Qwen3Config", {**SMALL, "head_dim": 8}, LLAMA | QK_NORM, {"attn.q_norm": "self_attn.q_norm"}),
    Case("qwen3_moe", "Qwen3MoeConfig", {**SMALL, **MOE, "head_dim": 8, "num_experts": 4},
         ATTN | QK_NORM | ROUTED | NORMS, {"ffn.experts": "mlp.experts", "ffn.router": "mlp.gate"}, width=16),
    Case("gemma", "GemmaConfig", {**SMALL, "head_dim": 8}, LLAMA),
    Case("gemma2", "Gemma2Config", {**SMALL, "head_dim": 8}, ATTN | GATED | SANDWICH,
         {"norm.attn_out": "post_attention_layernorm", "norm.ffn": "pre_feedforward_layernorm"}),
    Case("gemma3_text", "Gemma3TextConfig", {**SMALL, "head_dim": 8}, ATTN | QK_NORM | GATED | SANDWICH,
         {"norm.ffn_out": "post_feedforward_layernorm", "norm.attn_out": "post_attention_layernorm"}),
    Case("phi", "PhiConfig", SMALL, ATTN | PLAIN | {"norm.attn"},
         {"attn.o": "self_attn.dense", "ffn.up": "mlp.fc1", "ffn.down": "mlp.fc2"},
         top=("model.embed_tokens", "model.final_layernorm", "lm_head"), parallel=True),
    Case("phi3", "Phi3Config", SMALL, FUSED_ATTN | {"ffn.gate_up", "ffn.down"} | NORMS,
         {"attn.qkv": "self_attn.qkv_proj", "ffn.gate_up": "mlp.gate_up_proj"}, lora=("qkv_proj",)),
    Case("stablelm", "StableLmConfig", SMALL, LLAMA),
    Case("starcoder2", "Starcoder2Config", SMALL, ATTN | PLAIN | NORMS, {"ffn.up": "mlp.c_fc", "ffn.down": "mlp.c_proj"}),
    Case("gpt2", "GPT2Config", GPT, FUSED_ATTN | PLAIN | NORMS,
         {"attn.qkv": "attn.c_attn", "attn.o": "attn.c_proj", "ffn.down": "mlp.c_proj", "norm.ffn": "ln_2"},
         layers="transformer.h", top=TRANSFORMER, width=128, lora=("c_attn",)),
    Case("gpt_bigcode", "GPTBigCodeConfig", GPT, FUSED_ATTN | PLAIN | NORMS, {"ffn.up": "mlp.c_fc"},
         layers="transformer.h", top=TRANSFORMER, width=128, lora=("c_attn",)),
    Case("gpt_neox", "GPTNeoXConfig", {k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
         FUSED_ATTN | PLAIN | NORMS, {"attn.qkv": "attention.query_key_value", "ffn.down": "mlp.dense_4h_to_h"},
         layers="gpt_neox.layers", top=("gpt_neox.embed_in", "gpt_neox.final_layer_norm", "embed_out"), parallel=True,
         lora=("query_key_value",)),
    Case("falcon", "FalconConfig", FALCON, FUSED_ATTN | PLAIN | {"norm.attn"},
         {"attn.qkv": "self_attention.query_key_value", "attn.o": "self_attention.dense", "norm.attn": "input_layernorm"},
         layers="transformer.h", top=("transformer.word_embeddings", "transformer.ln_f", "lm_head"), width=128,
         parallel=True, lora=("query_key_value",)),
    Case("cohere", "CohereConfig", SMALL, ATTN | GATED | {"norm.attn"}, parallel=True),
    Case("olmo", "OlmoConfig", SMALL, ATTN | GATED, top=("model.embed_tokens", None, "lm_head")),
    Case("olmo2", "Olmo2Config", SMALL, ATTN | QK_NORM | GATED | {"norm.attn_out", "norm.ffn_out"},
         {"norm.attn_out": "post_attention_layernorm", "norm.ffn_out": "post_feedforward_layernorm"}),
    Case("granite", "GraniteConfig", SMALL, LLAMA),
]


