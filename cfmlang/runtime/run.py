"""Running compiled artifacts: tokenise, generate, stream tokens."""
from __future__ import annotations

from pathlib import Path
from typing import TextIO

import torch

from cfmlang.api import load
from cfmlang.artifact.read import refused_by_transformers, tokenizer_files


def generate(directory, prompt: str, *, max_new_tokens: int = 64, chat: bool = True,
             sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
             stream: TextIO | None = None, target: str | None = None, device: str | None = None,
             trust_code: bool = False) -> str:
    """Generate a completion of `prompt` with the artifact in `directory`; returns the new text.

    The artifact's lowered program runs when it has one (`target` picks another, e.g.
    "eager"), with a static KV cache. With `stream`, tokens are written to it as they are
    produced. `trust_code` loads native programs this machine did not build."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = load(directory, target=target, device=device, trust_code=trust_code)
    tokenizer = load_tokenizer(Path(directory))
    inputs = {name: value.to(model.device) for name, value in encode(tokenizer, prompt, chat).items()}
    streamer = _Streamer(tokenizer, stream) if stream is not None else None
    torch.manual_seed(seed)
    settings = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **settings)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


def load_tokenizer(directory: Path):
    """The tokenizer of an artifact `load` accepted (its manifest, program and config.json
    checked); E218 when it has none or transformers cannot load it."""
    from transformers import AutoTokenizer

    tokenizer_files(directory)
    with refused_by_transformers(f"the tokenizer in {directory}", "E218"):
        return AutoTokenizer.from_pretrained(directory)


def encode(tokenizer, prompt: str, chat: bool) -> dict:
    if chat and tokenizer.chat_template:
        return dict(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True))
    return dict(tokenizer(prompt, return_tensors="pt"))


class _Streamer:
    """Adapts transformers' TextStreamer to any text stream."""

    def __new__(cls, tokenizer, stream: TextIO):
        from transformers import TextStreamer

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                stream.write(text + ("\n" if stream_end else ""))
                stream.flush()

        return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
