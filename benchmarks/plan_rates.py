"""Measure what `cfmc plan` estimates: per merge method, the input bytes merged per second
and the peak resident memory, against the plan's estimate, on random Llama models.

    .venv/bin/python benchmarks/plan_rates.py [--hidden 512] [--layers 8]

Each method runs in a fresh process (`--one METHOD` below) so that its peak RSS is its
own. Absolute speed depends on the machine's load, so each method's rate is printed as a
ratio to `linear` measured in the same run, and the table at the end scales those ratios
to `--linear-anchor`, the linear rate measured on an idle 2-core machine by
benchmarks/merge_vs_mergekit.py (3 x 1.34 GB in 5.3 s). That table is what
cfmlang/ops/merge/__init__.py uses."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

ONE_INPUT = {"slerp", "nearswap", "arcee_fusion", "passthrough"}
NODE_OPTIONS = {"slerp": "  t: 0.4\n", "nearswap": "  t: 0.001\n"}
NEEDS_WEIGHT = {"linear", "multislerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
DENSITY = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}


def program(method: str, models: dict[str, Path]) -> str:
    from cfmlang.ops import lookup

    base = lookup("merge", method).base
    lines = [f'model {n}:\n  source: hf "{p}"\n' for n, p in models.items()]
    inputs = ["b"] if method in ONE_INPUT else ["b", "c"]
    if base == "none":
        inputs = ["a", *inputs][: 1 if method in ONE_INPUT else 3]
    params = []
    if method in NEEDS_WEIGHT:
        params.append("weight: 0.5")
    if method in DENSITY:
        params.append("density: 0.5")
    body = "".join(f"    {i}: {{{', '.join(params)}}}\n" for i in inputs)
    base_line = "  base: a\n" if base != "none" else ""
    return "".join(lines) + f"merge m:\n  method: {method}\n{base_line}{NODE_OPTIONS.get(method, '')}" \
        f"  inputs:\n{body}output: m\n"


def peak_rss() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited from
    the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def one(method: str, folder: Path) -> None:
    """Run in a child: compile one method without cache and print the measurements."""
    import cfmlang

    models = {n: folder / n for n in "abc"}
    text = program(method, models)
    plan = cfmlang.plan(text, use_cache=False, force=True)
    before = peak_rss()
    start = time.perf_counter()
    cfmlang.compile(text, folder / f"out-{method}", use_cache=False, force=True)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    print(json.dumps({"method": method, "seconds": seconds, "bytes_read": plan.bytes_read,
                      "estimated_peak": plan.peak_bytes, "measured_peak": peak, "rss_before": before}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--methods", default="")
    parser.add_argument("--linear-anchor", type=float, default=3 * 1.34e9 / 5.3,
                        help="bytes of input per second of linear on the reference machine")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "FOLDER"))
    args = parser.parse_args()
    if args.one:
        one(args.one[0], Path(args.one[1]))
        return
    from models import tiny_model

    from cfmlang.ops.merge.base import MERGEKIT_METHODS

    methods = args.methods.split(",") if args.methods else MERGEKIT_METHODS
    methods = ["linear"] + [m for m in methods if m != "linear"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i, name in enumerate("abc"):
            tiny_model(folder / name, seed=i + 1, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                       vocab_size=16 * args.hidden)
        rates = {}
        print(f"{'method':18} {'seconds':>8} {'MB read':>8} {'MB/s':>7} {'vs linear':>9} "
              f"{'est. peak MiB':>14} {'RSS MiB':>8}")
        for method in methods:
            proc = subprocess.run([sys.executable, __file__, "--one", method, str(folder)],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"{method:18} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rate = r["bytes_read"] / r["seconds"]
            rates[method] = rate
            print(f"{method:18} {r['seconds']:8.2f} {r['bytes_read'] / 1e6:8.1f} {rate / 1e6:7.1f} "
                  f"{rate / rates['linear']:9.3f} "
                  f"{r['estimated_peak'] / 2**20:14.0f} {r['measured_peak'] / 2**20:8.0f}")
        scaled = {m: float(f"{args.linear_anchor * r / rates['linear']:.2g}") for m, r in rates.items()}
        print("BYTES_PER_SECOND =", json.dumps(scaled, indent=4))


if __name__ == "__main__":
    main()
