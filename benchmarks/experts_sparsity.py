"""SmolLM2 routed through its own FFN experts: perplexity against the fraction of FFN
neurons active, and the routed FFN's decode latency against the dense FFN, in one run.

For each split (kmeans, cooccurrence, functional, random) the script compiles a real routed artifact
(`route: {method: topk, router: ROUTER, k: count}`, ROUTER from `--router`) with cfmlang,
loads it, and measures held-out perplexity (benchmarks/data/heldout.txt, text the
calibration corpus does not contain) with every routed FFN running k of `count` experts,
for each router of `--routers`:

- mlp: the trained router from the artifact (only when `--router mlp`);
- similarity, quantized: what `router: similarity` / `router: quantized` compile to; they
  depend only on the packed weights, so they are built from the loaded artifact instead
  of another compile;
- oracle: the true top-k by activation mass per token (router None in RoutedMLP).

The anchor is the dense model's perplexity on the same tokens in the same process.

Latency, one token (decode), the dense HF LlamaMLP against RoutedMLP's gather formulation
with the artifact's router included, best of `--repeat` rounds (each round times the
dense FFN and every fraction in turn, so a slow spell of this shared machine does not
spoil one variant's rounds only), three ways:
- decode: one pass over all of SmolLM2's FFNs in order, as a decode step runs them; each
  FFN's weights have left the caches by the time it runs again (30 FFNs, 318 MB in fp32),
  so this is the latency a generating model sees; reported per FFN;
- hot: layer 15's FFN called again and again, its weights staying in cache (a lower bound
  that rewards computing less over reading less);
- lowered: the decode pass compiled as `cfmc compile --target inductor` compiles a model
  (torch.export, then AOTInductor): one program runs all 30 dense FFNs, one program per
  fraction all 30 routed FFNs, each on the same token (the outputs are summed so that no
  FFN is dead code); reported per FFN. The anchor is the dense FFNs in float32 (what
  `--no-pack` compiles); two more dense programs are timed beside it: with Inductor's
  freezing (oneDNN-prepacked weights, which cfmlang does not use) and with the weights
  packed as their GGUF block codes (the default decode program for SmolLM2).
  `--no-lowered` skips it (eight compiles, about 20 s each).

    .venv/bin/python benchmarks/experts_sparsity.py [--tokens 1024] [--count 24] [--router mlp]
        [--routers mlp,similarity,quantized,oracle] [--calibration-tokens 4096]
        [--splits kmeans,cooccurrence,functional,random] [--repeat 15] [--threads 1] [--no-lowered]
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import cfmlang
from cfmlang.compiler.lower.inductor import INDUCTOR_CONFIGS, compile_package
from cfmlang.compiler.lower.packing import pack_linears, swapped
from cfmlang.cachedir import default_cache_dir
from cfmlang.runtime.routed_mlp import RoutedMLP, make_router
from cfmlang.ops.experts.routers import build_router

HERE = Path(__file__).parent
HELDOUT = HERE / "data" / "heldout.txt"
FRACTIONS = (1.0, 0.75, 0.5, 1 / 3, 0.25)
SPLITS = ("kmeans", "cooccurrence", "functional", "random")
ROUTERS = ("mlp", "similarity", "quantized", "oracle")
WINDOW = 256


def program(split: str, count: int, calibration_tokens: int, router: str) -> str:
    return ('import "std/smollm2.brick"\n'
            f"brick e:\n  kind: experts\n  from: smollm2.layers[*].mlp\n  split: {split}\n  count: {count}\n"
            f"  calibration_tokens: {calibration_tokens}\n"
            f"route r:\n  method: topk\n  experts: e\n  router: {router}\n  k: {count}\n"
            f"  calibration_tokens: {calibration_tokens}\n"
            "output: r\n")


def original_smollm2(scratch: Path):
    """SmolLM2 in its own neuron order (a routed artifact's dense weights are reordered
    expert by expert, which breaks the down projections' GGUF blocks)."""
    from transformers import AutoModelForCausalLM

    out = scratch / "smollm2"
    cfmlang.compile('import "std/smollm2.brick"\noutput: smollm2\n', out, cache_dir=default_cache_dir())
    return AutoModelForCausalLM.from_pretrained(out).eval()


def heldout_windows(tokenizer, tokens: int) -> list[torch.Tensor]:
    ids = tokenizer(HELDOUT.read_text(), add_special_tokens=False)["input_ids"][:tokens]
    return [torch.tensor(ids[i:i + WINDOW]).unsqueeze(0) for i in range(0, len(ids) - 1, WINDOW)]


def perplexity(model, windows: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            logits = model(window).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    return math.exp(total / count)


def routed_layers(model) -> list[RoutedMLP]:
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, RoutedMLP)]


def router_of(kind: str, mlp: RoutedMLP, compiled: str, own):
    """The router `kind` for one routed FFN: the artifact's own when it was compiled with
    that kind, else what compiling with it would build from the FFN's packed weights
    (similarity, quantized need no text; None for the oracle)."""
    if kind == compiled:
        return own
    built = build_router(kind, mlp.columns(), mlp.act, None, mlp.k, epochs=1, seed=0)
    return make_router(kind, built.tensors, mlp.act, mlp.count)


def set_router(model, kind: str, compiled: str, own_routers: list) -> None:
    for mlp, own in zip(routed_layers(model), own_routers):
        mlp.router = router_of(kind, mlp, compiled, own)


def set_k(model, k: int) -> None:
    for mlp in routed_layers(model):
        mlp.k = k


def best_times(variants: dict, repeat: int, inner: int) -> dict[str, float]:
    """Best over `repeat` rounds of each variant's mean seconds per call. A variant is
    (prepare, calls): `prepare()` sets it up, then `calls` (a list of (function, input))
    run `inner` times in order. Every round times all variants in turn, so a slow spell
    of the machine spoils one round of every variant, not every round of one."""
    best = dict.fromkeys(variants, math.inf)
    with torch.inference_mode():
        for prepare, calls in variants.values():
            prepare()
            for call, x in calls * 2:
                call(x)
        for _ in range(repeat):
            for name, (prepare, calls) in variants.items():
                prepare()
                start = time.perf_counter()
                for _ in range(inner):
                    for call, x in calls:
                        call(x)
                best[name] = min(best[name], (time.perf_counter() - start) / (inner * len(calls)))
    return best


def with_k(routed: list[RoutedMLP], k: int):
    """A `prepare` that sets every routed FFN's k."""
    def prepare():
        for mlp in routed:
            mlp.k = k
    return prepare


def unchanged():
    pass


class DecodePass(nn.Module):
    """All of a model's FFNs applied in layer order to one token's hidden state x, as one
    program: x + the sum of their outputs."""

    def __init__(self, mlps: list[nn.Module]):
        super().__init__()
        self.mlps = nn.ModuleList(mlps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for mlp in self.mlps:
            out = out + mlp(x)
        return out


def lowered(module: nn.Module, x: torch.Tensor, package: Path, configs: dict = INDUCTOR_CONFIGS):
    """`module` exported and compiled by AOTInductor as `--target inductor` compiles a
    model (its Inductor configs, ATen's means and cos/sin), loaded back."""
    start = time.perf_counter()
    with torch.no_grad():
        compile_package(torch.export.export(module, (x,)), package, print, configs)
    print(f"compiled {package.stem} in {time.perf_counter() - start:.0f} s", flush=True)
    return torch._inductor.aoti_load_package(str(package))


def lowered_latency(original_model, routed: list[RoutedMLP], count: int, x: torch.Tensor,
                    repeat: int, scratch: Path) -> dict:
    """Seconds per FFN of a compiled decode pass: the dense FFNs of `original_model`
    (SmolLM2 in its own neuron order) three ways, and the routed FFNs at each fraction.

    - dense: float32 weights, as `--target inductor --no-pack` compiles them (the anchor);
    - dense_frozen: float32 weights with Inductor's freezing (oneDNN-prepacked weights),
      which `--target inductor` leaves off (it changes eager's bits, and folds packed codes);
    - dense_packed: the weights as their GGUF block codes, as the default `--target
      inductor` decode program reads SmolLM2's FFNs."""
    dense = [layer.mlp for layer in original_model.model.layers]

    def program(mlps: list[nn.Module], name: str, configs: dict = INDUCTOR_CONFIGS):
        return [(lowered(DecodePass(mlps), x, scratch / f"{name}.pt2", configs), x)]

    variants = {"dense": (unchanged, program(dense, "dense")),
                "dense_frozen": (unchanged, program(dense, "dense-frozen", {**INDUCTOR_CONFIGS, "freezing": True}))}
    packed, report = pack_linears(original_model)
    print(f"SmolLM2's linear layers: {report.describe()}", flush=True)
    with swapped(original_model, packed):      # the same MLP modules, their linears packed
        variants["dense_packed"] = (unchanged, program(dense, "dense-packed"))
    for fraction in FRACTIONS:
        k = max(1, round(count * fraction))
        with_k(routed, k)()
        variants[f"{fraction:.2f}"] = (unchanged, program(routed, f"routed-{fraction:.2f}"))
    return {name: seconds / len(dense) for name, seconds in best_times(variants, repeat, 5).items()}


def latency(dense_model, routed_model, count: int, repeat: int, scratch: Path | None) -> dict:
    """Seconds per FFN per decode step, dense and routed (gather) at each fraction, over
    all layers in order (`decode`), over layer 15 alone (`hot`) and, with a `scratch`
    folder for the programs, all layers in order as one AOTInductor program (`lowered`)."""
    x = torch.randn(1, 1, dense_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    dense = [layer.mlp for layer in dense_model.model.layers]
    routed = routed_layers(routed_model)
    for mlp in routed:
        mlp.formulation = "gather"
    out = {}
    for regime, (dense_calls, routed_calls, inner) in {
            "decode": (dense, routed, 5), "hot": (dense[15:16], routed[15:16], 50)}.items():
        variants = {"dense": (unchanged, [(mlp, x) for mlp in dense_calls])}
        for fraction in FRACTIONS:
            variants[f"{fraction:.2f}"] = (with_k(routed, max(1, round(count * fraction))),
                                           [(mlp, x) for mlp in routed_calls])
        out[regime] = best_times(variants, repeat, inner)
    if scratch is not None:
        out["lowered"] = lowered_latency(original_smollm2(scratch), routed, count, x, repeat, scratch)
    for mlp in routed:
        mlp.formulation = "auto"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens for perplexity")
    parser.add_argument("--count", type=int, default=24, help="experts per FFN")
    parser.add_argument("--repeat", type=int, default=15, help="latency timing rounds (best is kept)")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--router", default="mlp", choices=ROUTERS[:-1],
                        help="the router compiled into the artifacts (and timed)")
    parser.add_argument("--routers", default=",".join(ROUTERS),
                        help="routers whose perplexity is measured (mlp only with --router mlp)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); on a loaded machine use 1: "
                             "embedding_bag's parallel path stalls when its threads are not all scheduled")
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--no-lowered", dest="lowered", action="store_false",
                        help="skip the AOTInductor decode-pass timing (eight compiles)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "experts_sparsity.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = {"count": args.count, "tokens": args.tokens, "calibration_tokens": args.calibration_tokens,
               "router": args.router,
               "threads": torch.get_num_threads(),
               "perplexity": {}, "latency_s": {}}
    with tempfile.TemporaryDirectory(prefix="cfm-bench-") as scratch:
        for split in args.splits.split(","):
            start = time.perf_counter()
            out = Path(scratch) / split
            cfmlang.compile(program(split, args.count, args.calibration_tokens, args.router), out,
                            cache_dir=default_cache_dir())
            print(f"compiled {split} with router {args.router} in {time.perf_counter() - start:.0f} s", flush=True)
            model = cfmlang.load(out).eval()
            if "dense" not in results["perplexity"]:
                tokenizer = AutoTokenizer.from_pretrained(out)
                windows = heldout_windows(tokenizer, args.tokens)
                dense = AutoModelForCausalLM.from_pretrained(out).eval()
                results["perplexity"]["dense"] = perplexity(dense, windows)
                results["latency_s"] = latency(dense, model, args.count, args.repeat,
                                               Path(scratch) if args.lowered else None)
                print(f"dense perplexity {results['perplexity']['dense']:.3f} on "
                      f"{sum(w.shape[1] for w in windows)} tokens", flush=True)
            own_routers = [mlp.router for mlp in routed_layers(model)]
            for router in args.routers.split(","):
                if router == "mlp" and args.router != "mlp":
                    continue
                set_router(model, router, args.router, own_routers)
                row = {}
                for fraction in FRACTIONS:
                    set_k(model, max(1, round(args.count * fraction)))
                    row[f"{fraction:.2f}"] = perplexity(model, windows)
                results["perplexity"][f"{split}/{router}"] = row
                print(split, router, {f: round(p, 3) for f, p in row.items()}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    plot(results, args.out.with_suffix(".png"))
    return 0


def report(results: dict) -> str:
    dense = results["perplexity"]["dense"]
    fractions = [f"{f:.2f}" for f in FRACTIONS]
    lines = [f"perplexity (dense {dense:.3f}; ratio to dense in brackets), FFN neurons active:", "",
             "| split / router | " + " | ".join(f"{float(f):.0%}" for f in fractions) + " |",
             "| --- |" + " --- |" * len(fractions)]
    for name, row in results["perplexity"].items():
        if name != "dense":
            lines.append(f"| {name} | " + " | ".join(f"{row[f]:.2f} ({row[f] / dense:.2f}x)" for f in fractions) + " |")
    timings = results["latency_s"]
    regimes = [("decode pass (all FFNs in turn)", "decode", "in a decode pass"),
               ("hot (one FFN, cached)", "hot", "hot"),
               ("decode pass, lowered (AOTInductor)", "lowered", "in a lowered decode pass")]
    regimes = [regime for regime in regimes if regime[1] in timings]
    dense_times = ", ".join(f"{timings[key]['dense'] * 1e6:.0f} us {where}" for _, key, where in regimes)
    lines += ["", f"FFN latency per token, routed ({results['router']} router) / dense, "
              f"{results['threads']} thread(s); dense: {dense_times}", "",
              "| active | " + " | ".join(f"{float(f):.0%}" for f in fractions) + " |",
              "| --- |" + " --- |" * len(fractions)]
    for name, key, _ in regimes:
        timing = timings[key]
        lines.append(f"| {name} | " + " | ".join(f"{timing[f] / timing['dense']:.2f}" for f in fractions) + " |")
    if "lowered" in timings:
        lines += ["", "lowered routed FFN against the other lowered dense programs:"]
        lowered_pass = timings["lowered"]
        for key, what in (("dense_frozen", "float32 with Inductor's freezing"), ("dense_packed", "GGUF block codes")):
            ratios = ", ".join(f"{float(f):.0%} {lowered_pass[f] / lowered_pass[key]:.2f}" for f in ("0.50", "0.25"))
            lines.append(f"- dense {what}: {lowered_pass[key] * 1e6:.0f} us per FFN; routed / it: {ratios}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    dense = results["perplexity"]["dense"]
    for name, row in results["perplexity"].items():
        if name != "dense":
            xs = [float(f) * 100 for f in row]
            axis.plot(xs, list(row.values()), marker="o", linestyle="--" if "oracle" in name else "-", label=name)
    axis.axhline(dense, color="black", linewidth=1, label="dense")
    axis.axhline(dense * 1.1, color="grey", linewidth=1, linestyle=":", label="dense + 10%")
    axis.set_xlabel("FFN neurons active (%)")
    axis.set_ylabel("held-out perplexity")
    axis.set_yscale("log")
    axis.invert_xaxis()
    axis.set_title(f"SmolLM2-135M, {results['count']} experts per FFN")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
