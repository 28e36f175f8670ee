"""Search trials as Ray tasks on a local cluster (a head without CPUs and two one-CPU
worker nodes, the session cluster of conftest.py): every trial runs on a worker, both workers run some, and the report is
that of a search run here."""
from __future__ import annotations

import json
import shutil

import pytest

from cfmlang.cli import main
from models import tiny_model, tiny_tokenizer
from test_search_run import PROGRAM, TEXT

def test_search_trials_spread_over_both_workers(cluster, tmp_path, capsys):
    for seed, name in enumerate("ab"):
        tiny_tokenizer(tiny_model(tmp_path / "models" / name, seed=seed + 21))
    (tmp_path / "tune.txt").write_text(TEXT)
    path = tmp_path / "blend.brick"
    path.write_text(PROGRAM.format(budget=4, sampler="random"))
    out = tmp_path / "out"
    assert main(["search", str(path), "-o", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--executor", "ray", "--address", cluster[0].address]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    trials = report["trials"]
    workers = {node.node_id for node in cluster[1]}
    assert len(trials) == 4 and {t["state"] for t in trials} == {"complete"}
    assert {t["node"] for t in trials} == workers        # both workers, never the head
    # the same search run here gives the same values their same objective
    local = tmp_path / "local"
    shutil.copytree(tmp_path, local, ignore=shutil.ignore_patterns("out", "cache", "local"))
    assert main(["search", str(local / "blend.brick"), "-o", str(local / "out"), "-q"]) == 0
    here = {json.dumps(t["values"], sort_keys=True): t["value"] for t in
            json.loads((local / "out" / "report.json").read_text())["trials"]}
    for trial in trials:
        key = json.dumps(trial["values"], sort_keys=True)
        if key in here:
            assert trial["value"] == pytest.approx(here[key], rel=1e-6)
