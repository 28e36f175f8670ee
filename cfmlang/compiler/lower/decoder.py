"""The exportable decoder: one forward step of a Llama-family causal LM over a static KV cache.

The HF model's own submodules (embeddings, norms, projections, MLPs, rotary embedding)
run unchanged; only the attention bookkeeping is restated so that every shape is a
function of the inputs' shapes: the cache is preallocated, written at `positions` and
read whole under a mask built from `positions`. Nothing depends on tensor values, so
`torch.export` traces it with a dynamic batch, sequence and cache length.

Two cache disciplines:
- in place (export, inductor): `keys[i]` and `values[i]` are updated with `index_copy_`;
  the exported program records them as mutated inputs, so a decode step costs no copy.
- functional (tensorrt): the updated caches are returned as outputs, because a TensorRT
  engine maps inputs to outputs and mutates nothing.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cfmlang.artifact.load import load_eager
from cfmlang.diagnostics import CompileError, error

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Families whose decoder layer this module restates: pre-norm attention (separate q, k,
v and o projections, rotary positions, optionally a per-head query/key norm) and a
pre-norm FFN, each added to the residual stream."""


class CachedDecoder(nn.Module):
    """`forward(input_ids [B,T], positions [T], keys, values) -> logits [B,T,V]`.

    `keys`/`values` are lists (one per layer) of `[B, kv_heads, S, head_dim]` tensors;
    `positions` are the cache slots (= token positions) of the T input tokens."""

    def __init__(self, model: nn.Module, functional_cache: bool = False):
        super().__init__()
        config = model.config
        self.embed_tokens = model.model.embed_tokens
        self.layers = model.model.layers
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.rotary_emb = model.model.rotary_emb
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.window = sliding_window(config)
        self.functional_cache = functional_cache

    def forward(self, input_ids, positions, keys: list[torch.Tensor], values: list[torch.Tensor]):
        hidden = self.embed_tokens(input_ids)
        cos, sin = (t[0] for t in self.rotary_emb(hidden, positions.unsqueeze(0)))
        allowed = self.attention_mask(positions, keys[0].shape[2])
        new_keys, new_values = [], []
        for index, layer in enumerate(self.layers):
            attended, key_cache, value_cache = self.attention(
                layer.self_attn, layer.input_layernorm(hidden), cos, sin, positions,
                keys[index], values[index], allowed)
            hidden = hidden + attended
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            new_keys.append(key_cache)
            new_values.append(value_cache)
        logits = self.lm_head(self.norm(hidden))
        if self.functional_cache:
            return logits, new_keys, new_values
        return logits

    def attention_mask(self, positions, cache_length: int):
        """[T, S] booleans: query t sees slot s when s <= positions[t] (and inside the window)."""
        slots = torch.arange(cache_length, device=positions.device)
        allowed = slots.unsqueeze(0) <= positions.unsqueeze(1)
        if self.window is not None:
            allowed = allowed & (slots.unsqueeze(0) > positions.unsqueeze(1) - self.window)
        return allowed

    def attention(self, attn, x, cos, sin, positions, key_cache, value_cache, allowed):
        batch, length, _ = x.shape
        group = self.heads // self.kv_heads
        # queries sharing a KV head stacked along the sequence axis: [B, kv, group*T, D]
        query = attn.q_proj(x).view(batch, length, self.kv_heads, group, self.head_dim)
        key = attn.k_proj(x).view(batch, length, self.kv_heads, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:     # per-head RMS norms before rotary (Qwen3)
            query, key = attn.q_norm(query), attn.k_norm(key)
        query = query.permute(0, 2, 3, 1, 4).reshape(batch, self.kv_heads, group * length, self.head_dim)
        key = key.transpose(1, 2)
        value = attn.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        query = rotate(query, cos.repeat(group, 1), sin.repeat(group, 1))
        key = rotate(key, cos, sin)
        if self.functional_cache:
            key_cache = key_cache.index_copy(2, positions, key.to(key_cache.dtype))
            value_cache = value_cache.index_copy(2, positions, value.to(value_cache.dtype))
        else:
            key_cache.index_copy_(2, positions, key.to(key_cache.dtype))
            value_cache.index_copy_(2, positions, value.to(value_cache.dtype))
        mask = allowed.repeat(group, 1)
        out = masked_attention(query, key_cache, value_cache, mask, attn.scaling)
        out = out.view(batch, self.kv_heads, group, length, self.head_dim).permute(0, 3, 1, 2, 4)
        return attn.o_proj(out.reshape(batch, length, -1)), key_cache, value_cache


def rotate(x, cos, sin):
    """Rotary position embedding; `cos`/`sin` are [T, D] and broadcast over leading axes."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def masked_attention(query, key_cache, value_cache, mask, scale: float):
    """softmax(q k^T * scale, masked) v over the whole cache, as one fused SDPA call."""
    return nn.functional.scaled_dot_product_attention(query, key_cache, value_cache, attn_mask=mask, scale=scale)


def sliding_window(config) -> int | None:
    """The attention window, None for full attention (Qwen's configs state a window they
    do not use unless `use_sliding_window`)."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


def empty_cache(config, batch: int, length: int, dtype: torch.dtype, device="cpu"):
    """Zeroed per-layer key and value caches `[batch, kv_heads, length, head_dim]`."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (batch, config.num_key_value_heads, length, head_dim)
    layers = config.num_hidden_layers
    return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)])


def load_for_lowering(directory: Path, manifest: dict, options) -> nn.Module:
    """The artifact's model in eval mode, LoRA adapters fused, cast to the lowering precision."""
    model = load_eager(directory, manifest)
    if hasattr(model, "merge_and_unload"):      # a PEFT adapter: fuse the static LoRA
        model = model.merge_and_unload()
    require_supported(model)
    precision = options.precision or ("float16" if options.target == "tensorrt" else None)
    dtype = getattr(torch, precision) if precision else None
    return model.to(device=options.device, dtype=dtype).eval()


def require_supported(model: nn.Module) -> None:
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise CompileError([error(
            "E173", f"lowering supports the Llama family ({', '.join(SUPPORTED_MODEL_TYPES)}), "
            f"not `{config.model_type}`", None, "compile with `--target eager`")])
    kinds = set(getattr(config, "layer_types", None) or ())
    if len(kinds) > 1:
        raise CompileError([error(
            "E173", f"lowering restates one attention kind for every layer, but this {config.model_type} "
            f"model mixes {', '.join(sorted(kinds))} layers", None, "compile with `--target eager`")])
