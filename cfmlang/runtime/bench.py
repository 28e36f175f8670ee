"""`cfmc bench DIR`: prefill and decode tokens/s of an artifact's lowered program against
an anchor measured in the same run: HF eager (transformers with its dynamic KV cache) on
the same weights, or, with `against`, another artifact's lowered program (e.g. a routed
model against the dense one).

Both sides decode greedily from the same random prompts; each repeat times the anchor
then the program, and the median is kept. Ratios are program / anchor (above 1: the
program is faster). JSON keys keep their names in both modes: `eager_*` is the anchor.
"""
from __future__ import annotations

import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from cfmlang.diagnostics import CompileError, error


def bench(directory, batches=(1, 8), prompt_tokens: int = 64, new_tokens: int = 32, repeat: int = 3,
          device: str | None = None, against=None, trust_code: bool = False) -> dict:
    from cfmlang.api import load

    compiled = lowered(directory, device, trust_code)
    if against is None:
        eager = load(directory, target="eager", dtype=compiled.dtype).to(compiled.device).eval()
        anchor, anchor_name, vocab = partial(eager_run, eager), "HF eager", eager.config.vocab_size
    else:
        other = lowered(against, str(compiled.device), trust_code)
        anchor, anchor_name = partial(compiled_run, other), f"{other.target} {Path(against)}"
        vocab = min(compiled.config.vocab_size, other.config.vocab_size)
    program = partial(compiled_run, compiled)
    load_before = machine_load()
    rows = [bench_batch(anchor, program, vocab, compiled.device, batch, prompt_tokens, new_tokens, repeat)
            for batch in batches]
    return {"directory": str(Path(directory)), "target": compiled.target, "anchor": anchor_name,
            "device": str(compiled.device), "dtype": str(compiled.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "repeat": repeat, "results": rows,
            "load": busiest(load_before, machine_load(own_threads=torch.get_num_threads()))}


BUSY_LOAD_PER_CORE = 0.5
"""A machine whose 1-minute load average exceeds this many runnable processes per core
is busy: other work shares the cores, and the measured ratios are not the machine's."""


def machine_load(own_threads: int = 0) -> dict:
    """The 1-minute load average, the core count, and whether the machine is busy: whether
    the load less `own_threads` (the benchmark's own threads, which a reading taken after
    the measurements includes) is above BUSY_LOAD_PER_CORE per core."""
    try:
        one_minute = os.getloadavg()[0]
    except OSError:
        return {"load_1min": None, "cores": os.cpu_count(), "own_threads": own_threads, "busy": False}
    cores = os.cpu_count() or 1
    others = max(0.0, one_minute - own_threads)
    return {"load_1min": round(one_minute, 2), "cores": cores, "own_threads": own_threads,
            "busy": others > BUSY_LOAD_PER_CORE * cores}


def busiest(*loads: dict) -> dict:
    """Of several load readings (before and after the measurements), the one with the most
    load besides the benchmark's own."""
    return max(loads, key=lambda load: (load["load_1min"] or 0.0) - load["own_threads"])


def load_line(load: dict) -> str:
    if load["load_1min"] is None:
        return "load average unknown"
    state = "busy: the ratios are not this machine's" if load["busy"] else "idle enough"
    return f"load average {load['load_1min']:.2f} on {load['cores']} cores ({state})"


def lowered(directory, device: str | None, trust_code: bool = False):
    from cfmlang.api import load
    from cfmlang.runtime.generation import LoweredModel

    model = load(directory, device=device, trust_code=trust_code)
    if not isinstance(model, LoweredModel):
        raise CompileError([error("E175", f"{directory} has no lowered program to benchmark", None,
                                  "compile it with `--target export|inductor|tensorrt`")])
    return model


def bench_batch(anchor, program, vocab: int, device, batch: int, prompt_tokens: int, new_tokens: int,
                repeat: int) -> dict:
    generator = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, vocab, (batch, prompt_tokens), generator=generator).to(device)
    with torch.inference_mode():
        anchor_tokens, _ = anchor(prompt, new_tokens)           # warm-up, and the reference
        program_tokens, _ = program(prompt, new_tokens)
        timings = {"anchor": [], "program": []}
        for _ in range(repeat):
            timings["anchor"].append(anchor(prompt, new_tokens)[1])
            timings["program"].append(program(prompt, new_tokens)[1])
    row = {"batch": batch, "same_greedy_tokens": torch.equal(anchor_tokens, program_tokens),
           "same_token_fraction": round(float((anchor_tokens == program_tokens).float().mean()), 3)}
    for phase, index, tokens in (("prefill", 0, batch * prompt_tokens), ("decode", 1, batch * new_tokens)):
        anchor_rate = tokens / statistics.median(t[index] for t in timings["anchor"])
        program_rate = tokens / statistics.median(t[index] for t in timings["program"])
        row[phase] = {"eager_tokens_per_s": round(anchor_rate, 2), "compiled_tokens_per_s": round(program_rate, 2),
                      "ratio": round(program_rate / anchor_rate, 3)}
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
    target, anchor = result["target"], result["anchor"]
    lines = [(f"{target} vs {anchor} on {result['device']} ({result['threads']} threads, {result['dtype']}), "
              f"prompt {result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, "
              f"median of {result['repeat']}; {load_line(result['load'])}"),
             f"{'batch':>5}  {'phase':<8}{'anchor tok/s':>14}{target + ' tok/s':>18}{'ratio':>9}  same greedy tokens"]
    for row in result["results"]:
        for phase in ("prefill", "decode"):
            cell = row[phase]
            lines.append(f"{row['batch']:>5}  {phase:<8}{cell['eager_tokens_per_s']:>14.1f}"
                         f"{cell['compiled_tokens_per_s']:>18.1f}{cell['ratio']:>8.2f}x  "
                         f"{row['same_token_fraction']:.0%}")
    return "\n".join(lines)
