"""A TIES merge of three random Llama checkpoints (~1.34 GB float32 each by default),
compiled locally and on a local Ray cluster (a head without CPUs and two one-CPU worker
nodes, on this machine); prints both wall times, their ratio, the driver's peak RSS in
each, the load average, and whether the two artifacts are byte-identical.

    .venv/bin/python benchmarks/ray_vs_local.py                  # three ~1.34 GB models
    .venv/bin/python benchmarks/ray_vs_local.py --layers 2 --hidden 256 --intermediate 1024 --vocab 4096

The models are built (once, cached by shape) under --work (benchmarks/work/, not
committed) by merge_vs_mergekit.py's builder. Each compile runs in a fresh process (no
cache, SOURCE_DATE_EPOCH fixed); the Ray cluster is started before the clock starts, so the
wall times compare the compiles (the workers' first import of cfmlang and torch is inside
the Ray time). The driver's peak RSS is that process's own (getrusage RUSAGE_SELF: not
the Ray head, raylets or workers, which are other processes). Also printed, for the
arithmetic in docs/distributed.md: the rate at which input bytes were merged, in total and
per worker CPU, and the driver's peak RSS as a share of one input model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from merge_vs_mergekit import ensure_models, log  # noqa: E402

BRICK = """model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
model c:
  source: hf "{c}"
merge mix:
  method: ties
  base: a
  inputs:
    b: {{weight: 0.6, density: 0.5}}
    c: {{weight: 0.4, density: [0.3, 0.7]}}
  dtype: float32
output: mix
"""

CHILD = """
import json, resource, sys, time
from pathlib import Path
from cfmlang.api import compile
brick, out, executor, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cluster = None
if executor == "ray":
    import ray
    from ray.cluster_utils import Cluster
    store = 512 * 1024**2      # object store per node: results in flight are a few 64 MB batches
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": store})
    for _ in range(workers):
        cluster.add_node(num_cpus=1, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
start = time.perf_counter()
compile(Path(brick), Path(out), use_cache=False, force=True, executor=executor)
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"wall": wall, "driver_peak_rss": rss}))
if cluster is not None:
    ray.shutdown()
    cluster.shutdown()
"""


def run(executor: str, brick: Path, out: Path, workers: int) -> dict:
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, str(brick), str(out), executor, str(workers)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{executor} compile failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def differences(first: Path, second: Path) -> list[str]:
    """The files (and, in safetensors files, the tensors) whose bytes differ."""
    names = sorted({p.name for p in first.iterdir()} | {p.name for p in second.iterdir()})
    found = []
    for name in names:
        a, b = first / name, second / name
        if not (a.is_file() and b.is_file()):
            found.append(f"{name}: only in {'ray' if b.is_file() else 'local'}")
        elif a.read_bytes() != b.read_bytes():
            found.append(name)
            if name.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(a, "pt") as x, safe_open(b, "pt") as y:
                    for tensor in x.keys():
                        left, right = x.get_tensor(tensor), y.get_tensor(tensor)
                        if not left.equal(right):
                            changed = (left != right).sum().item()
                            found.append(f"  {tensor}: {changed} of {left.numel()} values differ, "
                                         f"largest by {(left - right).abs().max().item():.3g}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes of the local Ray cluster")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep both artifacts in this folder (default: deleted)")
    shape = parser.add_argument_group("model shape (defaults: ~1.34 GB float32 each)")
    for flag, default in (("hidden", 1024), ("intermediate", 4096), ("layers", 16), ("heads", 16),
                          ("kv-heads", 16), ("vocab", 32000), ("shards", 2), ("seed", 1234)):
        shape.add_argument(f"--{flag}", type=int, default=default)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    folders, model_bytes, _ = ensure_models(args)
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        scratch = Path(scratch) if args.keep is None else args.keep.resolve()
        scratch.mkdir(parents=True, exist_ok=True)
        brick = scratch / "ties.brick"
        brick.write_text(BRICK.format(a=folders[0], b=folders[1], c=folders[2]))
        load_before = os.getloadavg()
        local = run("local", brick, scratch / "local", args.workers)
        log(f"local: {local['wall']:.1f} s, driver peak RSS {local['driver_peak_rss'] / 2**20:.0f} MiB")
        remote = run("ray", brick, scratch / "ray", args.workers)
        log(f"ray ({args.workers} workers): {remote['wall']:.1f} s, "
            f"driver peak RSS {remote['driver_peak_rss'] / 2**20:.0f} MiB")
        different = differences(scratch / "local", scratch / "ray")
    gb, inputs = model_bytes / 1e9, 3 * model_bytes
    print(f"models: 3 x {gb:.2f} GB float32; load average before/after: "
          f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"local wall {local['wall']:.2f} s ({local['wall'] / gb:.2f} s per GB of one input; "
          f"{inputs / local['wall'] / 1e6:.1f} MB/s of input merged, one process)")
    print(f"ray   wall {remote['wall']:.2f} s ({remote['wall'] / gb:.2f} s per GB of one input; "
          f"{inputs / remote['wall'] / 1e6:.1f} MB/s of input merged, "
          f"{inputs / remote['wall'] / args.workers / 1e6:.1f} MB/s per worker CPU)")
    print(f"ray / local wall: {remote['wall'] / local['wall']:.2f}")
    print(f"driver peak RSS: local {local['driver_peak_rss'] / 2**20:.0f} MiB "
          f"({local['driver_peak_rss'] / model_bytes:.2f} x one input), ray "
          f"{remote['driver_peak_rss'] / 2**20:.0f} MiB ({remote['driver_peak_rss'] / model_bytes:.2f} x one input); "
          f"ray / local {remote['driver_peak_rss'] / local['driver_peak_rss']:.2f}")
    print(f"artifacts byte-identical: {not different}")
    for line in different[:40]:
        print(f"  differs: {line}")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
