"""Measure what `cfmc plan` estimates: per merge method, the input bytes merged per second
and the peak resident memory, against the plan's estimate, on random Llama models.

    .venv/bin/python benchmarks/plan_rates.py [--hidden 512] [--layers 8]
    .venv/bin/python benchmarks/plan_rates.py --kinds [--hidden 256] [--layers 4]

`--kinds` measures the rates of the other node kinds, in the same run as `linear`: the
FLOPs per second of a causal LM's training steps (6 FLOPs per parameter and token), as a
ratio to linear and scaled to the anchor (MODEL_FLOPS_PER_SECOND in cfmlang/ops/base.py),
then compiles one node of each kind (attach, lora training and extraction, an edit, a
fine-tune, experts and a routed top-k, widen, upcycle) and prints the measured time over
the plan's estimate.

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


KIND_PROGRAMS = {
    "attach": "brick t:\n  kind: lora\n  source: peft \"{root}/lora\"\n  base: a\n"
              "model fused:\n  from: a\n  attach: [t]\noutput: fused\n",
    "lora_train": "brick t:\n  kind: lora\n  base: a\n  train: {{data: \"{root}/talk.jsonl\", steps: 6, rank: 4, "
                  "batch_size: 2, max_length: 32}}\noutput: t\n",
    "lora_extract": "brick d:\n  kind: lora\n  extract: {{from: b, base: a, rank: 8}}\noutput: d\n",
    "rome": "update e:\n  method: rome\n  from: a\n  steps: 10\n  calibration_texts: 16\n"
            "  facts:\n    - {{prompt: \"the sea of the\", subject: \"sea\", target: \" poem\"}}\noutput: e\n",
    "finetune": "update f:\n  method: finetune\n  from: a\n  train: a.layers[0]\n  data: \"{root}/train.txt\"\n"
                "  steps: 6\n  batch_size: 2\n  max_length: 32\noutput: f\n",
    "experts": "brick e:\n  kind: experts\n  from: a.layers[*].mlp\n  split: cooccurrence\n  count: 8\n"
               "  calibration_tokens: 2048\nroute r:\n  method: topk\n  experts: e\n  router: mlp\n  k: 2\n"
               "  calibration_tokens: 2048\noutput: r\n",
    "widen": "grow w:\n  method: widen\n  from: a\n  intermediate_size: {wide}\noutput: w\n",
    "upcycle": "grow u:\n  method: upcycle\n  from: a\n  experts: 4\noutput: u\n",
}


def model_flops(folder: Path) -> None:
    """Run in a child: FLOPs per second of training steps of model `a` (6 per parameter and token)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder / "a")
    parameters = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()          # warm up
    start = time.perf_counter()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
    seconds = time.perf_counter() - start
    print(json.dumps({"flops_per_second": 6 * parameters * ids.numel() * 3 / seconds}))


def one_kind(kind: str, folder: Path) -> None:
    """Run in a child: compile one node kind without cache; measured and estimated seconds."""
    import cfmlang

    config = json.loads((folder / "a" / "config.json").read_text())
    text = f'model a:\n  source: hf "{folder / "a"}"\nmodel b:\n  source: hf "{folder / "b"}"\n' + \
        KIND_PROGRAMS[kind].format(root=folder, wide=2 * config["intermediate_size"])
    plan = cfmlang.plan(text, use_cache=False, force=True)
    start = time.perf_counter()
    cfmlang.compile(text, folder / f"out-{kind}", use_cache=False, force=True)
    print(json.dumps({"kind": kind, "seconds": time.perf_counter() - start, "estimated": plan.seconds}))


def kinds(args, folder: Path) -> None:
    from models import peft_adapter, tiny_tokenizer

    for name in "ab":
        tiny_tokenizer(folder / name, vocab_size=16 * args.hidden)
    peft_adapter(folder / "lora", folder / "a", seed=5, r=8)
    words = "the sea sky poem story code loop sum verse rhyme night love".split()
    (folder / "talk.jsonl").write_text("".join(json.dumps({"prompt": f"a {w}", "response": f"the {w} of the sea"}) + "\n"
                                               for w in words))
    (folder / "train.txt").write_text(" ".join(words * 200) + "\n")
    linear = child("--one", "linear", folder)
    flops = child("--flops", str(folder))
    if linear is None or flops is None:
        return
    linear_rate = linear["bytes_read"] / linear["seconds"]
    ratio = flops["flops_per_second"] / linear_rate
    print(f"model FLOPs/s: {flops['flops_per_second'] / 1e9:.2f} G, {ratio:.2f} per byte/s of linear; scaled to "
          f"the anchor: MODEL_FLOPS_PER_SECOND = {float(f'{ratio * args.linear_anchor:.2g}'):g}")
    print(f"{'kind':14} {'seconds':>8} {'estimated':>9} {'measured / estimated':>21}")
    for kind in KIND_PROGRAMS:
        r = child("--one-kind", kind, folder)
        if r is not None:
            print(f"{kind:14} {r['seconds']:8.2f} {r['estimated']:9.2f} {r['seconds'] / r['estimated']:21.2f}")


def child(*argv) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, *map(str, argv)], capture_output=True, text=True)
    if proc.returncode:
        print(f"{' '.join(map(str, argv))} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--methods", default="")
    parser.add_argument("--linear-anchor", type=float, default=3 * 1.34e9 / 5.3,
                        help="bytes of input per second of linear on the reference machine")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "FOLDER"))
    parser.add_argument("--kinds", action="store_true", help="the rates of the node kinds other than merges")
    parser.add_argument("--one-kind", nargs=2, metavar=("KIND", "FOLDER"))
    parser.add_argument("--flops", metavar="FOLDER")
    args = parser.parse_args()
    if args.one:
        one(args.one[0], Path(args.one[1]))
        return
    if args.one_kind:
        one_kind(args.one_kind[0], Path(args.one_kind[1]))
        return
    if args.flops:
        model_flops(Path(args.flops))
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
        if args.kinds:
            kinds(args, folder)
            return
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
