"""A tiny Llama with planted specialised FFN neurons (with the word-level test tokenizer)
and probe directories, for the analysis tests (no hub access)."""
from __future__ import annotations

from pathlib import Path

import torch
from models import TINY, tiny_tokenizer
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

ABILITIES = ("alpha", "beta", "gamma")
PLANTED_LAYER = 1
PLANTED = {"alpha": 5, "beta": 20, "gamma": 41}      # neuron of PLANTED_LAYER per ability
FIRST_WORD, WORDS_PER_ABILITY = 8, 30                 # ability f uses words 8+30f .. 8+30f+29


def ability_words(index: int) -> range:
    start = FIRST_WORD + WORDS_PER_ABILITY * index
    return range(start, start + WORDS_PER_ABILITY)


def planted_model(folder: Path, seed: int = 0, planted: dict[str, tuple[int, ...]] | None = None) -> Path:
    """Token embeddings ~ N(0, 1), except hidden dimensions 0..2: dimension f is 2 for
    ability f's words and 0 for every other word, and no FFN neuron reads them except the
    planted ones: neuron PLANTED[f] of layer PLANTED_LAYER reads dimension f through gate and up, and
    writes it back through down_proj; lm_head rows of f's words read dimension f, so the
    neuron helps predict ability f's next words. `planted` may give several neurons per
    ability (default: PLANTED)."""
    planted = planted or {name: (neuron,) for name, neuron in PLANTED.items()}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.model.embed_tokens.weight[:, :len(ABILITIES)] = 0.0
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:, :len(ABILITIES)] = 0.0
            layer.mlp.up_proj.weight[:, :len(ABILITIES)] = 0.0
        mlp = model.model.layers[PLANTED_LAYER].mlp
        for index, name in enumerate(ABILITIES):
            words = list(ability_words(index))
            model.model.embed_tokens.weight[words, index] = 2.0
            for neuron in planted[name]:
                mlp.gate_proj.weight[neuron] = 0.0
                mlp.up_proj.weight[neuron] = 0.0
                mlp.gate_proj.weight[neuron, index] = 3.0
                mlp.up_proj.weight[neuron, index] = 3.0
                mlp.down_proj.weight[:, neuron] = 0.0
                mlp.down_proj.weight[index, neuron] = 0.05
            model.lm_head.weight[words, index] += 1.0
    model.save_pretrained(folder)
    return tiny_tokenizer(folder, TINY["vocab_size"])


def write_probes(folder: Path, model: Path, per_ability: int, seed: int = 0, abilities=ABILITIES) -> Path:
    """One ABILITY.txt per ability: prompts of 6-14 random words of that ability (words of
    the tokenizer saved with `model`)."""
    vocabulary = AutoTokenizer.from_pretrained(model).convert_ids_to_tokens(list(range(TINY["vocab_size"])))
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(abilities):
        words = list(ability_words(index))
        prompts = []
        for _ in range(per_ability):
            length = int(torch.randint(6, 15, (1,), generator=generator))
            picks = torch.randint(0, len(words), (length,), generator=generator)
            prompts.append(" ".join(vocabulary[words[p]] for p in picks))
        (folder / f"{name}.txt").write_text("\n---\n".join(prompts) + "\n")
    return folder
