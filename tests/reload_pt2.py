"""Run by tests in a fresh process: greedy decoding with nothing but torch and the artifact's
`lowered/model.pt2` (or, for routed models, `prefill.pt2` and `decode.pt2`; read with
`torch.export.load`) and `config.json`.

usage: reload_pt2.py ARTIFACT_DIR PROMPT_IDS_JSON NEW_TOKENS  -> prints the new token ids (JSON)
"""
import json
import sys
from pathlib import Path

import torch

directory, prompt, new_tokens = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
config = json.loads((directory / "config.json").read_text())
lowered = directory / "lowered"
if (lowered / "model.pt2").is_file():
    prefill = decode = torch.export.load(lowered / "model.pt2").module()
else:
    prefill, decode = (torch.export.load(lowered / f"{name}.pt2").module() for name in ("prefill", "decode"))
head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
shape = (1, config["num_key_value_heads"], len(prompt) + new_tokens, head_dim)
keys = [torch.zeros(shape) for _ in range(config["num_hidden_layers"])]
values = [torch.zeros(shape) for _ in range(config["num_hidden_layers"])]
tokens = []
with torch.no_grad():
    logits = prefill(torch.tensor([prompt]), torch.arange(len(prompt)), keys, values)
    for step in range(new_tokens):
        tokens.append(int(logits[0, -1].argmax()))
        logits = decode(torch.tensor([[tokens[-1]]]), torch.tensor([len(prompt) + step]), keys, values)
print(json.dumps(tokens))
