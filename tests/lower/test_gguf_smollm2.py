"""SmolLM2 compiled with `--target gguf --quant q8_0`: transformers reads the file back and
its greedy continuations of three chat prompts are the artifact's own."""
from __future__ import annotations

import json

import torch

from cfmlang.cli import main
from paths import REPO

PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "How do I sort a list in Python?")
NEW_TOKENS = 24


def greedy(model, tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_smollm2_q8_0_gguf_gives_the_artifacts_greedy_tokens(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smol"
    assert main(["compile", str(REPO / "examples" / "smol.brick"), "-o", str(out), "--target", "gguf",
                 "--quant", "q8_0", "-q"]) == 0
    lowered = json.loads((out / "cfm.json").read_text())["lowered"]
    assert lowered["tensor_types"] == {"F32": 61, "Q8_0": 211}   # 30 layers x 7 matrices + embeddings; norms

    original = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    gguf_model = AutoModelForCausalLM.from_pretrained(out / "lowered", gguf_file="model.gguf",
                                                      dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(out / "lowered", gguf_file="model.gguf")
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    for prompt in PROMPTS:
        want = greedy(original, tokenizer, prompt)
        assert greedy(gguf_model, gguf_tokenizer, prompt) == want, prompt
