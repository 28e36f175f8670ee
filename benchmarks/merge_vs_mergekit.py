#!/usr/bin/env python3
"""Peak memory and wall time of a streamed linear merge: cfmlang (`cfmc compile`) vs mergekit 0.1.5.

    .venv/bin/python benchmarks/merge_memory.py [--work benchmarks/work] [--json results.json]

1. Builds (once, cached under --work) three random float32 Llama checkpoints of >= 1 GB
   each, written tensor by tensor from seeded generators (never a whole model in memory),
   as 2 safetensors shards + model.safetensors.index.json + config.json.
2. Runs, each in a fresh subprocess, (a) an idle interpreter that imports torch
   (baseline), (b) `cfmc compile` of the linear merge of the three models, (c)
   `mergekit-yaml` of the same merge. Peak RSS is sampled with psutil every --interval
   seconds over the whole process tree and cross-checked with the kernel's high-water
   mark, getrusage(RUSAGE_CHILDREN).ru_maxrss, taken in a tiny launcher process whose only
   child is the measured command.
3. Checks that both outputs are equal tensor by tensor (torch.equal).
4. Prints a table and the ratios (RSS always above the idle baseline).
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
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
MiB = 1024 ** 2
WEIGHTS = {"a": 0.5, "b": 0.3, "c": [0.1, 0.9]}
TARGET_FRACTION = 0.25


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


# ---------------------------------------------------------------- merge configs

def brick_text(folders: list[Path]) -> str:
    lines = []
    for name, folder in zip("abc", folders):
        lines += [f"model {name}:", f'  source: hf "{folder.resolve()}"']
    lines += ["merge mix:", "  method: linear", "  dtype: float32", "  inputs:"]
    for name in "abc":
        lines.append(f"    {name}: {{weight: {json.dumps(WEIGHTS[name])}}}")
    lines.append("output: mix")
    return "\n".join(lines) + "\n"


def mergekit_yaml(folders: list[Path]) -> str:
    lines = ["merge_method: linear", "dtype: float32", "models:"]
    for name, folder in zip("abc", folders):
        lines += [f"  - model: {folder.resolve()}",
                  f"    parameters: {{weight: {json.dumps(WEIGHTS[name])}}}"]
    return "\n".join(lines) + "\n"


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
                                  check=True).stdout.strip()
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


def compare_outputs(ours: Path, theirs: Path, folders: list[Path], layers: int) -> dict:
    """Tensor-by-tensor torch.equal of both outputs, plus a formula check on small tensors."""
    import torch
    from safetensors import safe_open

    a, b = output_index(ours), output_index(theirs)
    if set(a) != set(b):
        sys.exit(f"tensor names differ: only ours {sorted(set(a) - set(b))[:5]}, "
                 f"only mergekit {sorted(set(b) - set(a))[:5]}")
    unequal, max_diff = [], 0.0
    handles: dict[Path, object] = {}

    def read(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    for name in sorted(a):
        x, y = read(a[name], name), read(b[name], name)
        if x.dtype != y.dtype or x.shape != y.shape:
            sys.exit(f"{name}: ours {x.dtype} {tuple(x.shape)} vs mergekit {y.dtype} {tuple(y.shape)}")
        if not torch.equal(x, y):
            unequal.append(name)
            max_diff = max(max_diff, (x.double() - y.double()).abs().max().item())
    # Both tools could agree and still be wrong: check the formula on the norm weights.
    inputs = [output_index(f) for f in folders]
    checked = 0
    for layer in (0, layers - 1):
        name = f"model.layers.{layer}.input_layernorm.weight"
        t = layer / (layers - 1) if layers > 1 else 1.0
        w = [0.5, 0.3, 0.1 + t * (0.9 - 0.1)]
        got = read(a[name], name).double()
        want = sum(wi * read(idx[name], name).double() for wi, idx in zip(w, inputs)) / sum(w)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        checked += 1
    return {"tensors": len(a), "unequal": len(unequal), "unequal_names": unequal[:20],
            "max_abs_diff": max_diff, "formula_checked": checked}


# ---------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=HERE / "work",
                        help="cache for models and outputs (default benchmarks/work, git-ignored)")
    parser.add_argument("--json", type=Path, help="write every number (and RSS timelines) here")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per tool; the table shows median wall time and max peak RSS")
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
    runs_dir = args.work / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    brick = runs_dir / "mix.brick"
    brick.write_text(brick_text(folders))
    yaml = runs_dir / "mix.yml"
    yaml.write_text(mergekit_yaml(folders))
    ours_out, mk_out = runs_dir / "out-cfmlang", runs_dir / "out-mergekit"

    python = sys.executable
    commands = {
        "baseline": [python, "-c", "import time, torch; time.sleep(1.0)"],
        "cfmlang": [str(BIN / "cfmc"), "compile", str(brick), "-o", str(ours_out), "-q"],
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
            run = measure(label if args.repeat == 1 else f"{label}#{k + 1}",
                          commands[label], runs_dir / f"{label}-{k + 1}.log", args.interval)
            if label != "baseline":
                run["sync_s"] = fsync_outputs(out)
                log(f"  fsync of its output afterwards: {run['sync_s']:.2f}s")
            runs[label].append(run)
    results = {label: summarize(runs[label]) for label in order}
    code_after = code_state()
    if code_after["sources_sha256"] != code["sources_sha256"]:
        log(f"WARNING: cfmlang's sources changed while the benchmark ran "
            f"({code['sources_sha256']} -> {code_after['sources_sha256']}); rerun for clean numbers")

    equality = None
    if not args.skip_mergekit:
        log("comparing outputs tensor by tensor ...")
        equality = compare_outputs(ours_out, mk_out, folders, args.layers)
        if equality["unequal"]:
            log(f"  NOT bit-exact: {equality['unequal']} of {equality['tensors']} tensors differ, "
                f"max abs diff {equality['max_abs_diff']:.3e}")
        else:
            log(f"  bit-exact: all {equality['tensors']} tensors torch.equal; "
                f"formula checked on {equality['formula_checked']} tensors")

    base = results["baseline"]["peak_rss"]
    base_k = results["baseline"]["ru_maxrss"]
    print()
    print(f"model size (one input): {model_bytes / MiB:.1f} MiB; largest tensor "
          f"{largest / MiB:.1f} MiB; 3 inputs")
    header = f"{'run':<10} {'wall s':>8} {'+fsync s':>9} {'peak RSS MiB':>13} {'above base':>11} " \
             f"{'anon MiB':>9} {'ru_maxrss MiB':>14} {'above base':>11} {'/ model':>8}"
    print(header)
    print("-" * len(header))
    for label in order:
        r = results[label]
        above, above_k = r["peak_rss"] - base, r["ru_maxrss"] - base_k
        frac = "" if label == "baseline" else f"{above / model_bytes:8.3f}"
        durable = "" if label == "baseline" else f"{r['durable_s']:9.2f}"
        print(f"{label:<10} {r['wall_s']:8.2f} {durable:>9} {r['peak_rss'] / MiB:13.1f} {above / MiB:11.1f} "
              f"{r['peak_anon'] / MiB:9.1f} {r['ru_maxrss'] / MiB:14.1f} {above_k / MiB:11.1f} {frac:>8}")
    print(f"wall: median of {args.repeat} run(s); +fsync: until the output is on disk; peak RSS: max "
          f"over runs, psutil, process tree, every {args.interval * 1000:.0f} ms;\nanon: its "
          "anonymous (not file-backed) part; ru_maxrss: kernel high-water mark; "
          "/ model: (peak RSS - baseline) / one model")
    print()

    ours = results["cfmlang"]
    ratios = {"ours_rss_above_base_over_model": (ours["peak_rss"] - base) / model_bytes,
              "ours_ru_maxrss_above_base_over_model": (ours["ru_maxrss"] - base_k) / model_bytes,
              "ours_rss_above_base_over_largest_tensor": (ours["peak_rss"] - base) / largest}
    verdict = "PASS" if ratios["ours_rss_above_base_over_model"] < TARGET_FRACTION else "FAIL"
    print(f"cfmlang peak RSS above baseline / one model size: "
          f"{ratios['ours_rss_above_base_over_model']:.3f} (ru_maxrss: "
          f"{ratios['ours_ru_maxrss_above_base_over_model']:.3f}; target < {TARGET_FRACTION}) "
          f"-> {verdict}")
    print(f"cfmlang peak RSS above baseline / largest tensor: "
          f"{ratios['ours_rss_above_base_over_largest_tensor']:.2f}")
    if "mergekit" in results:
        mk = results["mergekit"]
        ratios["wall_ours_over_mergekit"] = ours["wall_s"] / mk["wall_s"]
        ratios["durable_ours_over_mergekit"] = ours["durable_s"] / mk["durable_s"]
        ratios["rss_above_base_ours_over_mergekit"] = (ours["peak_rss"] - base) / (mk["peak_rss"] - base)
        ratios["ru_maxrss_above_base_ours_over_mergekit"] = \
            (ours["ru_maxrss"] - base_k) / (mk["ru_maxrss"] - base_k)
        print(f"wall time cfmlang / mergekit: {ratios['wall_ours_over_mergekit']:.3f} "
              f"(wall + fsync of the output, i.e. until it is on disk: "
              f"{ratios['durable_ours_over_mergekit']:.3f})")
        print(f"peak RSS above baseline cfmlang / mergekit: "
              f"{ratios['rss_above_base_ours_over_mergekit']:.3f} (ru_maxrss: "
              f"{ratios['ru_maxrss_above_base_ours_over_mergekit']:.3f})")
        print("outputs: " + ("bit-exact (torch.equal on every tensor)" if not equality["unequal"]
                             else f"{equality['unequal']} tensors differ, max abs diff "
                                  f"{equality['max_abs_diff']:.3e}"))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "versions": versions, "cfmlang_source": code, "cfmlang_source_after": code_after,
            "model": {k: getattr(args, k) for k in (
                "hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "shards", "seed")},
            "model_bytes": model_bytes, "largest_tensor_bytes": largest, "weights": WEIGHTS,
            "interval_s": args.interval, "results": results, "ratios": ratios,
"equality": equality,
            "target_fraction": TARGET_FRACTION, "verdict": verdict}, indent=1) + "\n")
        log(f"wrote {args.json}")
    if not args.keep_outputs:
        shutil.rmtree(ours_out, ignore_errors=True)
        shutil.rmtree(mk_out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
