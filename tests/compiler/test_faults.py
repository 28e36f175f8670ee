"""Faults during a compile: SIGKILL, SIGINT and SIGTERM at random points, a full disk.

Each test starts from a previous artifact at the output path (and, for the kills, the
build cache its compile left) and checks that after the fault the output holds either
that artifact, byte for byte, or the complete new one (equal to a reference compile),
that every cache entry is complete with the old ones still there, and that the next
compile cleans up whatever the killed process left beside the output.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cfmlang
from cfmlang.cli import main
from paths import TESTS
from kill_points import cache_entries

PROGRAM = """model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
merge mix:
  method: linear
  inputs:
    a: {{weight: 0.5}}
    b: {{weight: {wb}}}
merge twice:
  method: task_arithmetic
  base: a
  inputs:
    mix: {{weight: 0.7}}
output: twice
"""
DRIVER = TESTS / "kill_points.py"
SIBLING = re.compile(r"^\.out\.(?:tmp|old)-(\d+)-")


def hashes(folder: Path) -> dict[str, str] | None:
    if not folder.exists():
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def versions(tiny_zoo, tmp_path, monkeypatch):
    """(program file, previous artifact, reference of the new artifact); the cache the
    previous compile left is in tmp_path/cache-old (the new one's in a cache of its own).
    SOURCE_DATE_EPOCH fixes the manifests' `created` time, here and in child processes."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764000000")
    program = tmp_path / "mix.brick"
    old, new = tmp_path / "old", tmp_path / "new"
    program.write_text(PROGRAM.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"], wb=0.5))
    cfmlang.compile(program, old, cache_dir=tmp_path / "cache-old")
    program.write_text(PROGRAM.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"], wb=0.25))
    cfmlang.compile(program, new, cache_dir=tmp_path / "cache-new")
    assert hashes(old) != hashes(new)
    return program, old, new


def run_driver(tmp_path: Path, program: Path, old: Path, signal_name: str, seed: int, count: int) -> dict:
    """Kill runs of the new compile over the old artifact and the old compile's cache, in
    which the models are cached and the changed merges are not."""
    out, cache = tmp_path / "runs" / "out", tmp_path / "runs" / "cache"
    out.parent.mkdir()
    job = {"argv": ["compile", str(program), "-o", str(out), "-q", "--cache-dir", str(cache)],
           "output": str(out), "previous": str(old), "cache": str(cache),
           "cache_baseline": str(tmp_path / "cache-old"),
           "seed": seed, "count": count, "signal": signal_name}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(DRIVER), str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def assert_old_or_complete_new(report: dict, old: Path, new: Path, cached_before: set[str]) -> tuple[int, int]:
    """Every run left the old artifact or the whole new one, and a cache whose entries
    are all complete, the old ones among them; returns how many runs kept / replaced."""
    before, after = hashes(old), hashes(new)
    kept = replaced = 0
    for run in report["results"]:
        assert run["files"] in (before, after), f"point {run['point']}: output is {run['files']}"
        assert all(run["cache"].values()), f"point {run['point']}: damaged cache entries {run['cache']}"
        assert cached_before <= set(run["cache"]), f"point {run['point']}: lost cache entries"
        kept += run["files"] == before
        replaced += run["files"] == after
        for name in run["siblings"]:   # only debris of the dead child, which the next run removes
            assert SIBLING.match(name), name
    return kept, replaced


def test_sigkill_at_20_random_points_keeps_old_artifact_or_writes_new_whole(versions, tmp_path):
    program, old, new = versions
    cached_before = set(cache_entries(tmp_path / "cache-old"))
    report = run_driver(tmp_path, program, old, "KILL", seed=20261124, count=20)
    assert report["dry_status"] == 0 and report["calls"] > 1000 and report["commit"]
    assert len(report["results"]) >= 20
    assert all(run["status"] == -9 for run in report["results"])
    kept, replaced = assert_old_or_complete_new(report, old, new, cached_before)
    assert kept and replaced      # points fell both before and after the atomic exchange
    assert any(len(run["cache"]) > len(cached_before) for run in report["results"])  # some stored new entries
    # whatever the last killed run left is swept by the next compile, which uses the cache
    out, cache = tmp_path / "runs" / "out", tmp_path / "runs" / "cache"
    assert main(["compile", str(program), "-o", str(out), "-q", "--cache-dir", str(cache)]) == 0
    assert hashes(out) == hashes(new)
    assert sorted(p.name for p in out.parent.iterdir()) == ["cache", "out"]
    assert all(cache_entries(cache).values())


def test_sigint_at_random_points_exits_130_and_cleans_up(versions, tmp_path):
    program, old, new = versions
    report = run_driver(tmp_path, program, old, "INT", seed=7, count=4)
    kept, replaced = assert_old_or_complete_new(report, old, new, set(cache_entries(tmp_path / "cache-old")))
    for run in report["results"]:
        assert run["status"] == 130, run
        assert run["siblings"] == [], run     # an interrupt cleans up after itself
    assert kept >= 4


def test_sigterm_at_random_points_exits_143_and_cleans_up(versions, tmp_path):
    """SIGTERM (as sent by `kill`, a job scheduler or a closing session's SIGHUP) is
    handled like Ctrl-C: the killed compile removes its own temporary sibling."""
    program, old, new = versions
    report = run_driver(tmp_path, program, old, "TERM", seed=15, count=4)
    kept, replaced = assert_old_or_complete_new(report, old, new, set(cache_entries(tmp_path / "cache-old")))
    for run in report["results"]:
        assert run["status"] in (143, 130), run     # 130: it arrived during the final move, which completed
        assert run["siblings"] == [], run
    assert kept >= 4


def test_sighup_exits_129_and_cleans_up(versions, tmp_path):
    """SIGHUP (a closing terminal or session) is handled as SIGTERM is."""
    program, old, new = versions
    report = run_driver(tmp_path, program, old, "HUP", seed=29, count=2)
    assert_old_or_complete_new(report, old, new, set(cache_entries(tmp_path / "cache-old")))
    for run in report["results"]:
        assert run["status"] in (129, 130), run
        assert run["siblings"] == [], run


def test_stale_sibling_of_a_live_process_is_left_alone(versions, tmp_path):
    """Only debris of dead processes is swept: a concurrent writer keeps its directory."""
    program, old, new = versions
    out = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getpid()}-abc"
    dead = tmp_path / ".out.tmp-999999999-abc"
    live.mkdir()
    dead.mkdir()
    assert main(["compile", str(program), "-o", str(out), "-q"]) == 0
    assert live.exists() and not dead.exists()


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from cfmlang.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_file_size_limit_mid_write_keeps_previous_artifact(versions, tmp_path):
    """RLIMIT_FSIZE makes writes past the limit fail with EFBIG, as on a full disk."""
    program, old, new = versions
    out = tmp_path / "out"
    shutil.copytree(old, out)
    limit = max(p.stat().st_size for p in new.iterdir()) // 2
    proc = subprocess.run([sys.executable, "-c", FULL_DISK.format(limit=limit), "compile", str(program),
                           "-o", str(out), "-q"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "error[E081]: cannot write the output" in proc.stderr and "Traceback" not in proc.stderr
    assert hashes(out) == hashes(old)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


TMPFS = """
set -e
mkdir -p "$1"
mount -t tmpfs -o size=$2 tmpfs "$1"
cp -r "$3" "$1/out"
{python} -c 'import sys; from cfmlang.cli import main; sys.exit(main(sys.argv[1:]))' compile "$4" -o "$1/out" -q \
    && echo "rc=0" || echo "rc=$?"
sha256sum "$1"/out/* | sed "s#$1/out/##"
ls -a "$1"
"""


def user_namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not user_namespaces_work(), reason="no unprivileged user+mount namespaces here")
def test_really_full_tmpfs_is_e081_and_keeps_previous_artifact(versions, tmp_path):
    """A real ENOSPC: a tmpfs (mounted in a private user namespace) with room for the
    previous artifact and half of the new one."""
    program, old, new = versions
    size = sum(p.stat().st_size for p in old.iterdir()) * 3 // 2
    mount = tmp_path / "small"
    script = TMPFS.format(python=sys.executable)
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script, "-",
                           str(mount), str(size), str(old), str(program)],
                          capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert "rc=1" in proc.stdout, proc.stdout + proc.stderr
    assert "error[E081]: cannot write the output" in proc.stderr
    assert "No space left on device" in proc.stderr
    listed = {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines() if len(line.split()) == 2}
    assert listed == hashes(old)
    leftovers = [line for line in proc.stdout.splitlines() if line.startswith(".out")]
    assert leftovers == []
