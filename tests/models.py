"""Tiny random models built in the tests themselves (no hub access)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
            tie_word_embeddings=False)


def tiny_model(folder: Path, seed: int, arch: str = "llama", dtype=torch.float32, **overrides) -> Path:
    """Save a tiny randomly initialised causal LM (safetensors) and return its folder."""
    torch.manual_seed(seed)
    settings = {**TINY, **overrides}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**settings))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **settings))
    with torch.no_grad():
        for parameter in model.parameters():   # make norms non-trivial too
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model.to(dtype).save_pretrained(folder)
    return Path(folder)


WORDS = ("the a of to in is was for on with as by at from code math poem story sum add "
         "function loop print number prove equation rhyme verse love night sky sea").split()


def tiny_tokenizer(folder: Path, vocab_size: int = 128) -> Path:
    """A word-level tokenizer of `vocab_size` entries (specials, then WORDS, then fillers)
    saved beside a tiny model, so prompt-driven code runs without a hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + list(WORDS)
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return Path(folder)


def byte_bpe_tokenizer(folder: Path, vocab_size: int = 128) -> Path:
    """A byte-level BPE tokenizer (GPT-2/Qwen style) of at most `vocab_size` entries,
    trained on WORDS and a few sentences, saved beside a tiny model. Unlike the
    word-level one it survives transformers rebuilding it as a family's own class
    (AutoTokenizer makes any tokenizer of a `qwen2` model a Qwen2Tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    texts = [" ".join(WORDS)] * 3 + ["the sea and the sky", "a poem of love at night", "the code in the loop"]
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], limit_alphabet=40,
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return Path(folder)


def peft_adapter(folder: Path, base: Path, seed: int, r: int = 4, targets=("q_proj", "v_proj"),
                 **config) -> Path:
    """Save a PEFT LoRA adapter for the model in `base`, made by peft itself, with random
    non-zero factors (a fresh adapter's B is zero, which would hide every bug)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, target_modules=list(targets), lora_alpha=config.pop("lora_alpha", 2 * r),
                                      **config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder)
    return Path(folder)


def layer_index(tensor_name: str) -> int | None:
    """The layer of a tiny Llama/Mistral tensor (`model.layers.N.`), an oracle of the tests'
    own, independent of cfmlang's architecture module."""
    import re

    match = re.search(r"(?:^|\.)layers\.(\d+)\.", tensor_name)
    return int(match.group(1)) if match else None


LINEAR_MERGE = """model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
merge mix:
  method: linear
  inputs:
    a: {{weight: 0.3}}
    b: {{weight: 0.7}}
output: mix
"""
"""A linear merge of two models (`.format(a=..., b=...)`): the smallest program that reads
two inputs and writes a model."""
