"""`cfmc bench DIR`: prefill and decode tokens/s of an artifact's lowered program against
HF eager (transformers with its dynamic KV cache) on the same weights, in the same run.

Both sides decode greedily from the same random prompts; each repeat times eager then
compiled, and the median is kept. Ratios are compiled / eager (above 1: compiled is faster).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from cfmlang.diagnostics import CompileError, error


def bench(directory, batches=(1, 8), prompt_tokens: int = 64, new_tokens: int = 32, repeat: int = 3,
          device: str | None = None) -> dict:
    from cfmlang.api import load
    from cfmlang.generation import LoweredModel

    compiled = load(directory, device=device)
    if not isinstance(compiled, LoweredModel):
        raise CompileError([error("E175", f"{directory} has no lowered program to benchmark", None,
                                  "compile it with `--target export|inductor|tensorrt`")])
    eager = load(directory, target="eager", dtype=compiled.dtype).to(compiled.device).eval()
    rows = [bench_batch(eager, compiled, batch, prompt_tokens, new_tokens, repeat) for batch in batches]
    return {"directory": str(Path(directory)), "target": compiled.target, "device": str(compiled.device),
            "dtype": str(compiled.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeat": repeat, "results": rows}


def bench_batch(eager, compiled, batch: int, prompt_tokens: int, new_tokens: int, repeat: int) -> dict:
    generator = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, eager.config.vocab_size, (batch, prompt_tokens), generator=generator)
    prompt = prompt.to(compiled.device)
    with torch.inference_mode():
        eager_tokens, _ = eager_run(eager, prompt, new_tokens)           # warm-up, and the reference
        compiled_tokens, _ = compiled_run(compiled, prompt, new_tokens)
        timings = {"eager": [], "compiled": []}
        for _ in range(repeat):
            timings["eager"].append(eager_run(eager, prompt, new_tokens)[1])
            timings["compiled"].append(compiled_run(compiled, prompt, new_tokens)[1])
    row = {"batch": batch, "same_greedy_tokens": torch.equal(eager_tokens, compiled_tokens)}
    for phase, index, tokens in (("prefill", 0, batch * prompt_tokens), ("decode", 1, batch * new_tokens)):
        eager_rate = tokens / statistics.median(t[index] for t in timings["eager"])
        compiled_rate = tokens / statistics.median(t[index] for t in timings["compiled"])
        row[phase] = {"eager_tokens_per_s": round(eager_rate, 2), "compiled_tokens_per_s": round(compiled_rate, 2),
                      "ratio": round(compiled_rate / eager_rate, 3)}
    return row


def eager_run(model, prompt, new_tokens: int):
    """Greedy tokens and (prefill, decode) seconds with transformers' own KV cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    start = clock(prompt)
    chosen = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
    prefilled = clock(prompt)
    tokens = [chosen]
    for _ in range(new_tokens):
        chosen = model(chosen.unsqueeze(1), past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
        tokens.append(chosen)
    return torch.stack(tokens, 1), (prefilled - start, clock(prompt) - prefilled)


def compiled_run(model, prompt, new_tokens: int):
    """Greedy tokens and (prefill, decode) seconds with the lowered program's static cache."""
    length = prompt.shape[1]
    start = clock(prompt)
    logits, cache = model.prefill(prompt, length + new_tokens + 1)
    chosen = logits[:, -1].argmax(-1)
    prefilled = clock(prompt)
    tokens = [chosen]
    for step in range(new_tokens):
        logits, cache = model.decode(chosen, length + step, cache)
        chosen = logits[:, -1].argmax(-1)
        tokens.append(chosen)
    return torch.stack(tokens, 1), (prefilled - start, clock(prompt) - prefilled)


def clock(like: torch.Tensor) -> float:
    if like.device.type == "cuda":
        torch.cuda.synchronize(like.device)
    return time.perf_counter()


def render_table(result: dict) -> str:
    target = result["target"]
    lines = [(f"{target} vs HF eager on {result['device']} ({result['threads']} threads, {result['dtype']}), "
              f"prompt {result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, "
              f"median of {result['repeat']}"),
             f"{'batch':>5}  {'phase':<8}{'eager tok/s':>14}{target + ' tok/s':>18}{'ratio':>9}  same greedy tokens"]
    for row in result["results"]:
        for phase in ("prefill", "decode"):
            cell = row[phase]
            lines.append(f"{row['batch']:>5}  {phase:<8}{cell['eager_tokens_per_s']:>14.1f}"
                         f"{cell['compiled_tokens_per_s']:>18.1f}{cell['ratio']:>8.2f}x  {row['same_greedy_tokens']}")
    return "\n".join(lines)
