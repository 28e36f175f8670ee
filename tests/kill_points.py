"""Fault-injection driver: run `cfmc compile` in forked children, each stopped by a real
signal at a chosen point of its execution, and report what the output looks like after.

A *point* is the k-th function call made by cfmlang's own code or by the file-system
helpers it uses (shutil, tempfile, os), in any thread: a profiler counts calls and the
child sends itself the signal at call k. A dry run counts the calls of a whole compile; the points
are then drawn at random from that range (seeded), plus the first call of each step that
moves the finished directory into place.

Run as `python tests/kill_points.py JOB.json`; JOB holds argv (for `cfmc`), output,
previous (a directory copied to `output` before each run), cache and cache_baseline
(likewise for the build cache), seed, count, signal (KILL or INT). Prints one JSON
object: the calls counted, and per point the exit status, the files of `output` with
their hashes, the siblings left beside it, and each cache entry with whether it is
complete and unchanged.
Imports happen once here, before any fork; the children only run the compile.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import cfmlang
from cfmlang.cli import main
from cfmlang.compiler.cache import Cache

WATCHED = tuple(str(Path(m.__file__).parent if m is cfmlang else Path(m.__file__))
                for m in (cfmlang, shutil, tempfile, os))
COMMIT_STEPS = {"_replace_directory", "_exchange", "rmtree", "_fsync_dir"}


HEARTBEAT_THREAD = "cfmc-heartbeat"
"""The thread of cli.progress.Heartbeat (not counted)."""


def run_child(argv: list[str], stop_at: int, signal_number: int, report: Path) -> None:
    """In a forked child: run the compile, signalling ourselves at call `stop_at`
    (0: never); write the number of calls, and the first call of each step of the
    final move, to `report`."""
    calls = 0
    commit: dict[str, int] = {}
    if signal.getsignal(signal_number) == signal.SIG_IGN:   # nohup ignores SIGHUP: a fresh shell does not
        signal.signal(signal_number, signal.SIG_DFL)

    def count(frame, event, arg):
        nonlocal calls
        if threading.current_thread().name == HEARTBEAT_THREAD:
            return    # its calls depend on the clock: points would not repeat from run to run
        if event in ("call", "c_call") and frame.f_code.co_filename.startswith(WATCHED):
            calls += 1
            if frame.f_code.co_name in COMMIT_STEPS:
                commit.setdefault(frame.f_code.co_name, calls)
            if calls == stop_at:
                os.kill(os.getpid(), signal_number)

    threading.setprofile(count)   # the producer thread that computes tensors
    sys.setprofile(count)
    code = main(argv)
    sys.setprofile(None)
    report.write_text(json.dumps({"calls": calls, "commit": sorted(commit.values())}))
    os._exit(code)


def fork_run(argv: list[str], stop_at: int, signal_number: int, report: Path) -> int:
    """Exit status of one child: its exit code, or -N when killed by signal N."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            run_child(argv, stop_at, signal_number, report)
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def snapshot(folder: Path) -> dict[str, str] | None:
    if not folder.exists():
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def siblings(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


def reset(output: Path, previous: Path, cache: Path, cache_baseline: Path) -> None:
    """The previous artifact at `output` and nothing beside it, and the cache as it was
    after the previous compile, so that every run makes the same calls as the dry run."""
    for name in siblings(output):
        shutil.rmtree(output.parent / name)
    for folder, source in ((output, previous), (cache, cache_baseline)):
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(source, folder)


def cache_entries(cache: Path) -> dict[str, bool]:
    """Every node entry in the cache, and whether it is complete and unchanged."""
    nodes = cache / "nodes"
    names = sorted(p.name for p in nodes.iterdir() if not p.name.startswith(".")) if nodes.is_dir() else []
    return {name: Cache(cache).lookup(name) is not None for name in names}


def main_driver(job: dict) -> dict:
    state = [Path(job[k]) for k in ("output", "previous", "cache", "cache_baseline")]
    output, cache = state[0], state[2]
    number = getattr(signal, "SIG" + job["signal"])
    report = Path(tempfile.mkdtemp()) / "report.json"
    reset(*state)
    cfmlang.check(Path(job["argv"][1]))   # model descriptions made once here, inherited by every child
    dry = fork_run(job["argv"], 0, number, report)
    measured = json.loads(report.read_text())
    points = random.Random(job["seed"]).sample(range(1, measured["calls"] + 1), job["count"])
    points = sorted(set(points) | set(measured["commit"]))
    results = []
    for point in points:
        reset(*state)
        status = fork_run(job["argv"], point, number, report)
        results.append({"point": point, "status": status, "files": snapshot(output),
                        "siblings": siblings(output), "cache": cache_entries(cache)})
    return {"dry_status": dry, "calls": measured["calls"], "commit": measured["commit"],
            "results": results}


if __name__ == "__main__":
    print(json.dumps(main_driver(json.loads(Path(sys.argv[1]).read_text()))))
