#!/usr/bin/env python3
"""Wall time and peak memory of streamed merges: cfmlang (`cfmc compile`) vs mergekit 0.1.5.

    .venv/bin/python benchmarks/merge_vs_mergekit.py [--methods linear,ties] [--repeat 3]
                                                     [--work benchmarks/work] [--json results.json]

1. Builds (once, cached under --work) three random float32 Llama checkpoints of >= 1 GB
   each, written tensor by tensor from seeded generators (never a whole model in memory),
   as 2 safetensors shards + model.safetensors.index.json + config.json.
2. For each merge method of --methods (the same three models each time), runs, each in a
   fresh subprocess and interleaved --repeat times, (a) an idle interpreter that imports
   torch (baseline), (b) `cfmc compile` of the merge, (c) `mergekit-yaml` of the same merge.
   Peak RSS is sampled with psutil every --interval seconds over the whole process tree
   and cross-checked with the kernel's high-water mark, getrusage(RUSAGE_CHILDREN).ru_maxrss,
   taken in a tiny launcher process whose only child is the measured command.
3. Checks that both outputs are equal tensor by tensor (torch.equal; the max absolute and
   relative differences otherwise) and that they follow the method's formula on a few
   small tensors (computed independently here).
4. Prints one table per method and a summary: speed-up (mergekit wall / cfmlang wall),
   peak RSS above the idle baseline cfmlang / mergekit, and, for linear, cfmlang's peak
   RSS above baseline / one model size.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
MiB = 1024 ** 2
TARGET_FRACTION = 0.25      # linear: cfmlang peak RSS above baseline / one model size, <
TARGET_SPEEDUP = 1.5        # mergekit wall / cfmlang wall, >=
TARGET_RSS_RATIO = 1.0      # peak RSS above baseline, cfmlang / mergekit, <=
REL_TOLERANCE = 1e-6        # outputs that differ by less (relative to the tensor's max |x|) pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- model construction

def tensor_plan(args) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor of a LlamaForCausalLM, in state-dict order."""
    h, i, v = args.hidden, args.intermediate, args.vocab
    head_dim = h // args.heads
    kv = args.kv_heads * head_dim
    plan = [("model.embed_tokens.weight", (v, h), "w")]
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        plan += [(p + "self_attn.q_proj.weight", (h, h), "w"),
                 (p + "self_attn.k_proj.weight", (kv, h), "w"),
                 (p + "self_attn.v_proj.weight", (kv, h), "w"),
                 (p + "self_attn.o_proj.weight", (h, h), "w"),
                 (p + "mlp.gate_proj.weight", (i, h), "w"),
                 (p + "mlp.up_proj.weight", (i, h), "w"),
                 (p + "mlp.down_proj.weight", (h, i), "w"),
                 (p + "input_layernorm.weight", (h,), "norm"),
                 (p + "post_attention_layernorm.weight", (h,), "norm")]
    plan += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "w")]
    return plan


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       max_position_embeddings=2048, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"], dtype="float32")


def model_key(args) -> str:
    fields = (args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads,
              args.vocab, args.shards, args.seed, "v1")
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:10]


def build_model(folder: Path, seed: int, args) -> None:
    """One random checkpoint, generated and written one shard at a time."""
    import torch
    from safetensors.torch import save_file

    plan = tensor_plan(args)
    total = sum(numel(s) * 4 for _, s, _ in plan)
    per_shard = -(-total // args.shards)
    shards: list[list] = [[]]
    used = 0
    for entry in plan:
        size = numel(entry[1]) * 4
        if shards[-1] and used + size > per_shard and len(shards) < args.shards:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    names = ([f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
             if len(shards) > 1 else ["model.safetensors"])
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    index = {n: k for k, (n, _, _) in enumerate(plan)}
    for shard_name, shard in zip(names, shards):
        state = {}
        for name, shape, kind in shard:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + index[name])
            t = torch.randn(shape, generator=gen, dtype=torch.float32)
            if kind == "norm":
                t.mul_(0.05).add_(1.0)
            else:
                t.mul_(0.02)
            state[name] = t
            weight_map[name] = shard_name
        save_file(state, str(tmp / shard_name), metadata={"format": "pt"})
        del state
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    llama_config(args).to_json_file(str(tmp / "config.json"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def ensure_models(args) -> tuple[list[Path], int, int]:
    """The three model folders (built if missing), one model's bytes, largest tensor bytes."""
    root = args.work / f"models-{model_key(args)}"
    plan = tensor_plan(args)
    model_bytes = sum(numel(s) * 4 for _, s, _ in plan)
    largest = max(numel(s) * 4 for _, s, _ in plan)
    folders = []
    for k, name in enumerate("abc"):
        folder = root / name
        done = folder / ".complete"
        if args.rebuild or not done.is_file():
            log(f"building model {name} ({model_bytes / 1e9:.2f} GB float32) in {folder} ...")
            start = time.perf_counter()
            build_model(folder, args.seed + k, args)
            (folder / ".complete").write_text("ok\n")
            log(f"  built {name} in {time.perf_counter() - start:.1f}s")
        else:
            log(f"using cached model {name}: {folder}")
        folders.append(folder)
    on_disk = sum(p.stat().st_size for p in folders[0].glob("*.safetensors"))
    if model_bytes < 1e9:
        log(f"WARNING: each model is only {model_bytes / 1e9:.2f} GB (< 1 GB); raise --layers/--vocab")
    log(f"each model: {model_bytes / MiB:.1f} MiB of tensors ({on_disk / MiB:.1f} MiB on disk, "
        f"{len(plan)} tensors); largest tensor {largest / MiB:.1f} MiB")
    # transformers must read the config; mergekit reads it when it runs below.
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(folders[0])
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"], config
    return folders, model_bytes, largest


# ---------------------------------------------------------------- merge methods

def interpolate(value, t: float) -> float:
    """mergekit's gradient rule: a list of numbers is a piecewise-linear curve over the
    layer position t in [0, 1]."""
    if not isinstance(value, list):
        return value
    if len(value) == 1:
        return value[0]
    scaled = t * (len(value) - 1)
    low = int(scaled)
    high = min(len(value) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * value[low] + frac * value[high]


def flow(params: dict) -> str:
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in params.items()) + "}"


@dataclass(frozen=True)
class Method:
    """One benchmarked merge: the same config as a .brick and as a mergekit YAML, and an
    independent float64 reference of the formula for the formula check."""

    name: str
    summary: str
    base: str | None                    # "a", "b" or "c", or None
    inputs: dict[str, dict]             # model -> per-input parameters (gradients allowed)
    options: dict                       # node-level options
    reference: Callable                 # (base tensor | None, [input tensors], [params]) -> float64
    memory_target: bool = False         # also check peak RSS above baseline / one model

    def brick(self, folders: list[Path]) -> str:
        lines = []
        for name, folder in zip("abc", folders):
            lines += [f"model {name}:", f'  source: hf "{folder.resolve()}"']
        lines += ["merge mix:", f"  method: {self.name}"]
        if self.base:
            lines.append(f"  base: {self.base}")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in self.options.items()]
        lines.append("  inputs:")
        lines += [f"    {name}: {flow(params)}" for name, params in self.inputs.items()]
        lines += ["  dtype: float32", "output: mix"]
        return "\n".join(lines) + "\n"

    def mergekit_yaml(self, folders: list[Path]) -> str:
        where = dict(zip("abc", (f.resolve() for f in folders)))
        lines = [f"merge_method: {self.name}", "dtype: float32"]
        if self.base:
            lines.append(f"base_model: {where[self.base]}")
        if self.options:
            lines.append("parameters:")
            lines += [f"  {k}: {json.dumps(v)}" for k, v in self.options.items()]
        lines.append("models:")
        for name, params in self.inputs.items():
            lines += [f"  - model: {where[name]}", f"    parameters: {flow(params)}"]
        return "\n".join(lines) + "\n"


def linear_reference(base, tensors, params):
    weights = [p["weight"] for p in params]
    return sum(w * t.double() for w, t in zip(weights, tensors)) / sum(weights)


def ties_reference(base, tensors, params):
    """TIES written out plainly: float32 task vectors (as both tools compute them), the
    `density` share of largest magnitudes kept (topk here, argsort in both tools), the
    rest in float64: weights, sign election by the sign of the sum, normalize by the
    weights of the agreeing inputs."""
    import torch

    rows = []
    for tensor, p in zip(tensors, params):
        delta = (tensor - base).reshape(-1)
        count = max(1, int(p["density"] * delta.numel()))
        keep = torch.zeros(delta.numel(), dtype=torch.bool)
        keep[delta.abs().topk(count).indices] = True
        rows.append(delta.double() * keep * p["weight"])
    deltas = torch.stack(rows)
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).double()
    agree = deltas.sign() == elected
    weights = torch.tensor([p["weight"] for p in params], dtype=torch.float64).unsqueeze(1)
    divisor = (weights * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return (base.double().reshape(-1) + (deltas * agree).sum(dim=0) / divisor).reshape(base.shape)


METHODS = {
    "linear": Method(
        "linear", "linear: a 0.5, b 0.3, c [0.1, 0.9] (gradient), float32",
        None, {"a": {"weight": 0.5}, "b": {"weight": 0.3}, "c": {"weight": [0.1, 0.9]}}, {},
        linear_reference, memory_target=True),
    "ties": Method(
        "ties", "ties: base a; b weight 0.6 density 0.5; c weight 0.4 density [0.3, 0.7] "
                "(gradient); normalize, int8_mask, float32",
        "a", {"b": {"weight": 0.6, "density": 0.5}, "c": {"weight": 0.4, "density": [0.3, 0.7]}},
        {"normalize": True, "int8_mask": True}, ties_reference),
}


# ---------------------------------------------------------------- measurement

def proc_rss(p: psutil.Process) -> tuple[int, int]:
    """(RSS, anonymous part of it) of one process. The rest of RSS is file-backed pages
    (shared libraries, mmap-ed weight files), which the kernel can drop under pressure."""
    try:
        with open(f"/proc/{p.pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith("Rss"))
        kib = {k: int(v.split()[0]) * 1024 for k, v in fields.items()}
        return kib["RssAnon"] + kib["RssFile"] + kib["RssShmem"], kib["RssAnon"]
    except (OSError, KeyError, ValueError):     # not Linux, or the process just exited
        try:
            return p.memory_info().rss, 0
        except psutil.Error:
            return 0, 0


def tree_rss(launcher: psutil.Process) -> tuple[int, int]:
    """Summed (RSS, anonymous RSS) of every process under the launcher (not the launcher)."""
    try:
        members = launcher.children(recursive=True)
    except psutil.Error:
        return 0, 0
    sizes = [proc_rss(p) for p in members]
    return sum(r for r, _ in sizes), sum(a for _, a in sizes)


# Runs the measured command and reports getrusage(RUSAGE_CHILDREN) for it alone. A small
# launcher is needed because Linux carries the spawning process's RSS high-water mark into
# the child's ru_maxrss across (v)fork + exec: spawned straight from this (torch-importing)
# script, every child would report at least this script's own peak.
LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as out:
    json.dump({"rc": rc, "wall_s": wall,
               "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, out)
"""


def measure(label: str, cmd: list[str], logfile: Path, interval: float) -> dict:
    """Run `cmd` in a fresh process; sample the RSS of its process tree until it exits."""
    load = os.getloadavg()[0]
    log(f"running {label} (1-min load average {load:.2f}): {' '.join(cmd)}")
    report = logfile.with_suffix(".rusage.json")
    with open(logfile, "wb") as out:
        start = time.perf_counter()
        popen = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *cmd],
                                 stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        launcher = psutil.Process(popen.pid)
        peak, peak_anon, timeline = 0, 0, []
        while popen.poll() is None:
            rss, anon = tree_rss(launcher)
            timeline.append((round(time.perf_counter() - start, 3), rss, anon))
            peak, peak_anon = max(peak, rss), max(peak_anon, anon)
            time.sleep(interval)
    got = json.loads(report.read_text()) if report.is_file() else {"rc": popen.returncode}
    if popen.returncode != 0 or got["rc"] != 0:
        sys.exit(f"{label} failed with exit code {got['rc']}; see {logfile}:\n"
                 + logfile.read_text()[-3000:])
    wall, maxrss = got["wall_s"], got["ru_maxrss_kib"] * 1024      # Linux reports KiB
    log(f"  {label}: wall {wall:.2f}s, sampled peak RSS {peak / MiB:.1f} MiB "
        f"(anonymous {peak_anon / MiB:.1f} MiB; {len(timeline)} samples), "
        f"ru_maxrss {maxrss / MiB:.1f} MiB")
    return {"label": label, "cmd": cmd, "load_avg_before": load, "wall_s": wall, "peak_rss": peak,
            "peak_anon": peak_anon, "ru_maxrss": maxrss,
            "samples": len(timeline), "timeline": timeline}


def prewarm(folders: list[Path]) -> None:
    """Read the inputs once so every run starts with the same (warm) page cache."""
    for folder in folders:
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as handle:
                while handle.read(1 << 24):
                    pass


def fsync_outputs(folder: Path) -> float:
    """Seconds to fsync every file the run wrote. cfmlang fsyncs its artifact before the
    atomic rename (so this is ~0 for it); mergekit leaves dirty pages in the page cache.
    Adding this to the wall time compares both at "output durably on disk"."""
    start = time.perf_counter()
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    return time.perf_counter() - start


def summarize(runs: list[dict]) -> dict:
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "durable_s": statistics.median(r["wall_s"] + r.get("sync_s", 0.0) for r in runs),
            "peak_rss": max(r["peak_rss"] for r in runs),
            "peak_anon": max(r["peak_anon"] for r in runs),
            "ru_maxrss": max(r["ru_maxrss"] for r in runs),
            "runs": runs}


def code_state() -> dict:
    """Which cfmlang source is measured: git HEAD, uncommitted files, a hash of its sources
    (the package may be edited while the benchmark runs; the hash shows it)."""
    from importlib.util import find_spec

    package = Path(find_spec("cfmlang").origin).parent
    digest = hashlib.sha256()
    for file in sorted(package.rglob("*")):
        if file.is_file() and file.suffix in (".py", ".lark", ".brick"):
            digest.update(str(file.relative_to(package)).encode() + b"\0" + file.read_bytes())

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=package, capture_output=True, text=True,
                                  check=True).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return ""
    dirty = [line[3:] for line in git("status", "--porcelain", "--", ".").splitlines()]
    return {"package": str(package), "head": git("rev-parse", "--short", "HEAD"),
            "uncommitted": dirty, "sources_sha256": digest.hexdigest()[:16]}


# ---------------------------------------------------------------- verification

def output_index(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                where[name] = file
    return where


def compare_outputs(method: Method, ours: Path, theirs: Path, folders: list[Path],
                    layers: int) -> dict:
    """Tensor-by-tensor torch.equal of both outputs (max absolute and relative differences
    where they are not equal), plus a formula check on the norm weights of the first and
    last layers (the ends of every gradient)."""
    import torch
    from safetensors import safe_open

    a, b = output_index(ours), output_index(theirs)
    if set(a) != set(b):
        sys.exit(f"{method.name}: tensor names differ: only ours {sorted(set(a) - set(b))[:5]}, "
                 f"only mergekit {sorted(set(b) - set(a))[:5]}")
    unequal, max_diff, max_rel = [], 0.0, 0.0
    handles: dict[Path, object] = {}

    def read(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    for name in sorted(a):
        x, y = read(a[name], name), read(b[name], name)
        if x.dtype != y.dtype or x.shape != y.shape:
            sys.exit(f"{method.name}: {name}: ours {x.dtype} {tuple(x.shape)} vs mergekit "
                     f"{y.dtype} {tuple(y.shape)}")
        if not torch.equal(x, y):
            unequal.append(name)
            diff = (x.double() - y.double()).abs().max().item()
            scale = max(y.double().abs().max().item(), 1e-30)
            max_diff, max_rel = max(max_diff, diff), max(max_rel, diff / scale)
        del x, y
    # Both tools could agree and still be wrong: check the formula on the norm weights.
    inputs = dict(zip("abc", (output_index(f) for f in folders)))
    names = [n for n in method.inputs]
    checked, formula_max_rel = 0, 0.0
    for layer in sorted({0, layers - 1}):
        name = f"model.layers.{layer}.input_layernorm.weight"
        t = layer / (layers - 1) if layers > 1 else 1.0
        params = [{k: interpolate(v, t) for k, v in method.inputs[n].items()} for n in names]
        base = read(inputs[method.base][name], name) if method.base else None
        want = method.reference(base, [read(inputs[n][name], name) for n in names], params)
        got = read(a[name], name).double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"{method.name} formula check, {name}: {m}")
        formula_max_rel = max(formula_max_rel,
                              ((got - want).abs().max() / want.abs().max()).item())
        checked += 1
    return {"tensors": len(a), "unequal": len(unequal), "unequal_names": unequal[:20],
            "max_abs_diff": max_diff, "max_rel_diff": max_rel,
            "within_tolerance": max_rel <= REL_TOLERANCE, "formula_checked": checked,
            "formula_max_rel_diff": formula_max_rel}


def describe_equality(eq: dict) -> str:
    if not eq["unequal"]:
        return f"bit-exact (torch.equal on all {eq['tensors']} tensors)"
    return (f"NOT bit-exact: {eq['unequal']} of {eq['tensors']} tensors differ, max abs diff "
            f"{eq['max_abs_diff']:.3e}, max relative diff {eq['max_rel_diff']:.3e} "
            + ("(within" if eq["within_tolerance"] else "(OVER") + f" the {REL_TOLERANCE:g} tolerance)")


# ---------------------------------------------------------------- running one method

def run_method(method: Method, folders: list[Path], args) -> dict:
    """baseline, cfmlang and mergekit, interleaved --repeat times; then the comparison."""
    runs_dir = args.work / "runs" / method.name
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    brick, yaml = runs_dir / "mix.brick", runs_dir / "mix.yml"
    brick.write_text(method.brick(folders))
    yaml.write_text(method.mergekit_yaml(folders))
    ours_out, mk_out = runs_dir / "out-cfmlang", runs_dir / "out-mergekit"
    log(f"=== {method.summary}")
    code = code_state()

    commands = {
        "baseline": [sys.executable, "-c", "import time, torch; time.sleep(1.0)"],
        "cfmlang": [str(BIN / "cfmc"), "compile", str(brick), "-o", str(ours_out), "-q", "--no-cache"],
        "mergekit": [str(BIN / "mergekit-yaml"), str(yaml), str(mk_out), "--no-cuda",
                     "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
    }
    order = ["baseline", "cfmlang"] + ([] if args.skip_mergekit else ["mergekit"])
    runs: dict[str, list[dict]] = {label: [] for label in order}
    for k in range(args.repeat):           # interleaved, so slow drifts hit every tool alike
        for label in order:
            out = ours_out if label == "cfmlang" else mk_out
            if label != "baseline":
                shutil.rmtree(out, ignore_errors=True)
                prewarm(folders)
            os.sync()   # no dirty pages left over from earlier work get flushed during the run
            tag = f"{method.name}/{label}" + ("" if args.repeat == 1 else f"#{k + 1}")
            run = measure(tag, commands[label], runs_dir / f"{label}-{k + 1}.log", args.interval)
            if label != "baseline":
                run["sync_s"] = fsync_outputs(out)
                log(f"  fsync of its output afterwards: {run['sync_s']:.2f}s")
            runs[label].append(run)
    results = {label: summarize(runs[label]) for label in order}
    code_after = code_state()
    if code_after["sources_sha256"] != code["sources_sha256"]:
        log(f"WARNING: cfmlang's sources changed while {method.name} was measured "
            f"({code['sources_sha256']} -> {code_after['sources_sha256']}); rerun for clean numbers")

    equality = None
    if not args.skip_mergekit:
        log(f"comparing {method.name} outputs tensor by tensor ...")
        equality = compare_outputs(method, ours_out, mk_out, folders, args.layers)
        log(f"  {describe_equality(equality)}; formula checked on {equality['formula_checked']} "
            f"tensors (max relative diff {equality['formula_max_rel_diff']:.1e})")
    if not args.keep_outputs:
        shutil.rmtree(ours_out, ignore_errors=True)
        shutil.rmtree(mk_out, ignore_errors=True)
    return {"summary": method.summary, "brick": brick.read_text(), "mergekit_yaml": yaml.read_text(),
            "cfmlang_source": code, "cfmlang_source_after": code_after,
            "results": results, "equality": equality}


def ratios_of(method: Method, measured: dict, model_bytes: int, largest: int) -> dict:
    results = measured["results"]
    base, base_k = results["baseline"]["peak_rss"], results["baseline"]["ru_maxrss"]
    ours = results["cfmlang"]
    ratios = {"ours_rss_above_base_over_model": (ours["peak_rss"] - base) / model_bytes,
              "ours_ru_maxrss_above_base_over_model": (ours["ru_maxrss"] - base_k) / model_bytes,
              "ours_rss_above_base_over_largest_tensor": (ours["peak_rss"] - base) / largest}
    verdicts = {}
    if method.memory_target:
        verdicts["rss_over_model"] = ratios["ours_rss_above_base_over_model"] < TARGET_FRACTION
    if "mergekit" in results:
        mk = results["mergekit"]
        ratios["speedup_mergekit_over_ours"] = mk["wall_s"] / ours["wall_s"]
        ratios["speedup_durable_mergekit_over_ours"] = mk["durable_s"] / ours["durable_s"]
        ratios["wall_ours_over_mergekit"] = ours["wall_s"] / mk["wall_s"]
        ratios["durable_ours_over_mergekit"] = ours["durable_s"] / mk["durable_s"]
        ratios["rss_above_base_ours_over_mergekit"] = (ours["peak_rss"] - base) / (mk["peak_rss"] - base)
        ratios["ru_maxrss_above_base_ours_over_mergekit"] = \
            (ours["ru_maxrss"] - base_k) / (mk["ru_maxrss"] - base_k)
        verdicts["speedup"] = ratios["speedup_mergekit_over_ours"] >= TARGET_SPEEDUP
        verdicts["rss_vs_mergekit"] = ratios["rss_above_base_ours_over_mergekit"] <= TARGET_RSS_RATIO
        verdicts["outputs"] = measured["equality"]["within_tolerance"]
    return {"ratios": ratios, "verdicts": verdicts}


def pass_fail(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(method: Method, measured: dict, model_bytes: int, args) -> None:
    results = measured["results"]
    base, base_k = results["baseline"]["peak_rss"], results["baseline"]["ru_maxrss"]
    print()
    print(f"== {method.summary}")
    header = f"{'run':<10} {'wall s':>8} {'+fsync s':>9} {'peak RSS MiB':>13} {'above base':>11} " \
             f"{'anon MiB':>9} {'ru_maxrss MiB':>14} {'above base':>11} {'/ model':>8}"
    print(header)
    print("-" * len(header))
    for label, r in results.items():
        above, above_k = r["peak_rss"] - base, r["ru_maxrss"] - base_k
        frac = "" if label == "baseline" else f"{above / model_bytes:8.3f}"
        durable = "" if label == "baseline" else f"{r['durable_s']:9.2f}"
        print(f"{label:<10} {r['wall_s']:8.2f} {durable:>9} {r['peak_rss'] / MiB:13.1f} {above / MiB:11.1f} "
              f"{r['peak_anon'] / MiB:9.1f} {r['ru_maxrss'] / MiB:14.1f} {above_k / MiB:11.1f} {frac:>8}")
    if measured["equality"] is not None:
        print(f"outputs: {describe_equality(measured['equality'])}")


def print_summary(methods: list[Method], measured: dict, checks: dict, args) -> None:
    print()
    print(f"wall: median of {args.repeat} run(s); +fsync: until the output is on disk; peak RSS: max "
          f"over runs, psutil, process tree, every {args.interval * 1000:.0f} ms;\nanon: its "
          "anonymous (not file-backed) part; ru_maxrss: kernel high-water mark; "
          "/ model: (peak RSS - baseline) / one model")
    print()
    print("summary")
    for method in methods:
        r, v = checks[method.name]["ratios"], checks[method.name]["verdicts"]
        print(f"{method.name}:")
        if "speedup_mergekit_over_ours" in r:
            print(f"  speed-up, wall mergekit / cfmlang: {r['speedup_mergekit_over_ours']:.2f}x "
                  f"(with the fsync of the output: {r['speedup_durable_mergekit_over_ours']:.2f}x; "
                  f"target >= {TARGET_SPEEDUP}) -> {pass_fail(v['speedup'])}")
            print(f"  peak RSS above baseline, cfmlang / mergekit: "
                  f"{r['rss_above_base_ours_over_mergekit']:.3f} (ru_maxrss: "
                  f"{r['ru_maxrss_above_base_ours_over_mergekit']:.3f}; target <= "
                  f"{TARGET_RSS_RATIO:g}) -> {pass_fail(v['rss_vs_mergekit'])}")
        if method.memory_target:
            print(f"  cfmlang peak RSS above baseline / one model size: "
                  f"{r['ours_rss_above_base_over_model']:.3f} (ru_maxrss: "
                  f"{r['ours_ru_maxrss_above_base_over_model']:.3f}; target < {TARGET_FRACTION}) "
                  f"-> {pass_fail(v['rss_over_model'])}")
        else:
            print(f"  cfmlang peak RSS above baseline / one model size: "
                  f"{r['ours_rss_above_base_over_model']:.3f} (no target)")
        print(f"  cfmlang peak RSS above baseline / largest tensor: "
              f"{r['ours_rss_above_base_over_largest_tensor']:.2f}")
        if measured[method.name]["equality"] is not None:
            print(f"  outputs: {describe_equality(measured[method.name]['equality'])}")


# ---------------------------------------------------------------- main

def parse_methods(text: str) -> list[Method]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    return [METHODS[n] for n in dict.fromkeys(names)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", type=parse_methods, default=list(METHODS.values()),
                        help=f"comma-separated merge methods (default {','.join(METHODS)})")
    parser.add_argument("--work", type=Path, default=HERE / "work",
                        help="cache for models and outputs (default benchmarks/work, git-ignored)")
    parser.add_argument("--json", type=Path, help="write every number (and RSS timelines) here")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per tool; the tables show median wall time and max peak RSS")
    parser.add_argument("--interval", type=float, default=0.02, help="RSS sampling period, s")
    parser.add_argument("--skip-mergekit", action="store_true", help="measure cfmlang only")
    parser.add_argument("--rebuild", action="store_true", help="regenerate the models")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged outputs")
    shape = parser.add_argument_group("model shape (defaults: ~1.34 GB float32 each)")
    shape.add_argument("--hidden", type=int, default=1024)
    shape.add_argument("--intermediate", type=int, default=4096)
    shape.add_argument("--layers", type=int, default=16)
    shape.add_argument("--heads", type=int, default=16)
    shape.add_argument("--kv-heads", type=int, default=16)
    shape.add_argument("--vocab", type=int, default=32000)
    shape.add_argument("--shards", type=int, default=2)
    shape.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)

    from importlib.metadata import version
    versions = {p: version(p) for p in ("cfmlang", "mergekit", "torch", "transformers", "safetensors")}
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    log(f"host: {psutil.cpu_count()} cpus, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM")
    folders, model_bytes, largest = ensure_models(args)
    code = code_state()
    log(f"cfmlang source: {code['package']} at {code['head'] or '?'}"
        + (f" + uncommitted changes in {', '.join(code['uncommitted'])}" if code["uncommitted"] else "")
        + f" (sources sha256 {code['sources_sha256']})")
    shutil.rmtree(args.work / "runs", ignore_errors=True)

    measured, checks = {}, {}
    for method in args.methods:
        measured[method.name] = run_method(method, folders, args)
        checks[method.name] = ratios_of(method, measured[method.name], model_bytes, largest)
    code_after = code_state()
    if code_after["sources_sha256"] != code["sources_sha256"]:
        log(f"WARNING: cfmlang's sources changed while the benchmark ran "
            f"({code['sources_sha256']} -> {code_after['sources_sha256']}); rerun for clean numbers")

    print()
    print(f"model size (one input): {model_bytes / MiB:.1f} MiB; largest tensor "
          f"{largest / MiB:.1f} MiB; 3 inputs")
    for method in args.methods:
        print_table(method, measured[method.name], model_bytes, args)
    print_summary(args.methods, measured, checks, args)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "versions": versions, "cfmlang_source": code, "cfmlang_source_after": code_after,
            "model": {k: getattr(args, k) for k in (
                "hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "shards", "seed")},
            "model_bytes": model_bytes, "largest_tensor_bytes": largest,
            "interval_s": args.interval, "repeat": args.repeat,
            "targets": {"speedup_mergekit_over_ours_min": TARGET_SPEEDUP,
                        "rss_above_base_ours_over_mergekit_max": TARGET_RSS_RATIO,
                        "linear_ours_rss_above_base_over_model_max": TARGET_FRACTION,
                        "output_rel_tolerance": REL_TOLERANCE},
            "methods": {m.name: {**measured[m.name], "inputs": m.inputs, "options": m.options,
                                 "base": m.base, **checks[m.name]} for m in args.methods},
        }, indent=1) + "\n")
        log(f"wrote {args.json}")
    # Missed speed or memory targets are reported, not errors; outputs that disagree are.
    wrong = [m.name for m in args.methods if checks[m.name]["verdicts"].get("outputs") is False]
    if wrong:
        log(f"ERROR: cfmlang and mergekit outputs disagree beyond {REL_TOLERANCE:g} for "
            f"{', '.join(wrong)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
