"""Write three tiny random Llama models (same shape, different seeds) for the examples.

    python examples/make_tiny_models.py [FOLDER]      # default: examples/models
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make(folder: Path) -> None:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         tie_word_embeddings=False)
    for seed, name in enumerate(["base", "math", "code"]):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder / name)
        print(f"wrote {folder / name}")


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "models")
