"""`cfmc search` on tiny random models: the trials, the report, the best program and its
artifact, and a search stopped by SIGTERM or SIGINT that resumes without running its
finished trials again."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cfmlang.analysis.target import load_directory
from cfmlang.cli import main
from cfmlang.eval import Settings, evaluate
from cfmlang.frontend.to_ast import parse
from models import tiny_model, tiny_tokenizer
from paths import REPO

PROGRAM = """# two tiny models, merged by task arithmetic
model a:
  source: hf "models/a"
model b:
  source: hf "models/b"
merge blend:
  method: task_arithmetic
  base: a
  inputs:
    b: {{weight: search(0.0, 1.0)}}
  normalize: one_of(false, true)
search best:
  target: blend
  objective:
    minimize:
      - {{task: "tune.txt", weight: 1.0}}
  budget: {budget}
  seed: 3
  sampler: {sampler}
"""
TEXT = "the sea is love and the sky is night for a poem of verse print the number add the sum " * 2
LINE = re.compile(r"^trial (\d+) \[(\d+)/(\d+)\]: ([0-9.e+-]+|failed);", re.M)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search-models")
    for seed, name in enumerate("ab"):
        tiny_tokenizer(tiny_model(root / name, seed=seed + 21))
    return root


def project(tmp_path: Path, models: Path, budget: int, sampler: str = "random") -> Path:
    shutil.copytree(models, tmp_path / "models")
    (tmp_path / "tune.txt").write_text(TEXT)
    path = tmp_path / "blend.brick"
    path.write_text(PROGRAM.format(budget=budget, sampler=sampler))
    return path


def test_a_search_writes_its_best_program_artifact_and_report(models, tmp_path, capsys):
    path = project(tmp_path, models, budget=5, sampler="cmaes")
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["search", str(path), "-o", str(out), "--cache-dir", str(cache)]) == 0
    err = capsys.readouterr().err
    lines = LINE.findall(err)
    assert [(n, k) for n, k, _, _ in lines] == [(str(i), str(i + 1)) for i in range(5)], err
    report = json.loads((out / "report.json").read_text())
    trials = report["trials"]
    assert len(trials) == 5 and {t["state"] for t in trials} == {"complete"}
    best = min(trials, key=lambda t: t["value"])
    assert report["best"]["number"] == best["number"] and report["best"]["values"] == best["values"]
    assert {d["name"] for d in report["space"]} == {"blend.inputs.b.weight", "blend.normalize"}
    assert set(report["importances"]) == {"blend.inputs.b.weight", "blend.normalize"}
    # the best program is a plain program with the best values, which compiles to the artifact
    text = (out / "best.brick").read_text()
    assert "search" not in text.replace("cfmc search", "").replace("(search `best`)", "") and "output: blend" in text
    body = parse(text).statements[2].body
    assert body.get("inputs").value.get("b").value.get("weight").value.value == best["values"]["blend.inputs.b.weight"]
    assert body.get("normalize").value.value == (best["values"]["blend.normalize"] == "true")
    shutil.copy(out / "best.brick", tmp_path / "best.brick")
    assert main(["compile", str(tmp_path / "best.brick"), "-o", str(tmp_path / "again"), "--no-cache", "-q"]) == 0
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == load_file(out / "model" / "model.safetensors").keys()
    for name, tensor in load_file(tmp_path / "again" / "model.safetensors").items():
        assert tensor.equal(load_file(out / "model" / "model.safetensors")[name]), name
    # the objective is cfmc eval's perplexity of the artifact
    loaded = load_directory(out / "model", "best")
    scored = evaluate(loaded.model, loaded.tokenizer, [tmp_path / "tune.txt"], Settings())
    assert scored.metric("tune", "perplexity") == pytest.approx(report["best"]["value"], rel=1e-9)
    assert (out / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "report.md").read_text()
    assert table.count("\n| ") == 7 and "Parameter importances" in table
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{i:04d}.brick" for i in range(5)]
    # run again: nothing left to do; a larger budget runs only the new trials
    assert main(["search", str(path), "-o", str(out), "--cache-dir", str(cache), "-q"]) == 0
    path.write_text(path.read_text().replace("budget: 5", "budget: 6"))
    assert main(["search", str(path), "-o", str(out), "--cache-dir", str(cache)]) == 0
    assert [n for n, *_ in LINE.findall(capsys.readouterr().err)] == ["5"]
    # another program in the same folder is refused
    path.write_text(path.read_text().replace("search(0.0, 1.0)", "search(0.0, 2.0)"))
    assert main(["search", str(path), "-o", str(out), "--cache-dir", str(cache)]) == 1
    assert "error[E265]" in capsys.readouterr().err


def test_a_search_stopped_by_sigterm_resumes_without_running_finished_trials(models, tmp_path):
    sent, status = signal.SIGTERM, 143
    path = project(tmp_path, models, budget=4)
    command = [sys.executable, "-m", "cfmlang", "search", str(path), "-o", str(tmp_path / "out"),
               "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in first.stderr:
        seen.append(line)
        if LINE.match(line):        # the first trial is stored: stop the search during the next
            first.send_signal(sent)
            break
    rest = first.stderr.read()
    assert first.wait(timeout=120) == status, "".join(seen) + rest
    assert "run the same command again to resume" in rest
    done_before = [n for n, *_ in LINE.findall("".join(seen) + rest)]
    assert 1 <= len(done_before) < 4
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    done_after = [n for n, *_ in LINE.findall(second.stderr)]
    assert not set(done_before) & set(done_after)
    assert len(done_before) + len(done_after) == 4
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(str(t["number"]) for t in report["trials"]) == sorted(done_before + done_after)
    assert {t["state"] for t in report["trials"]} == {"complete"}


def test_a_search_interrupted_in_process_resumes(models, tmp_path):
    """Ctrl-C as the search reports its second trial (through the Python API)."""
    from cfmlang.search.driver import Interrupted
    from cfmlang.search.study import SearchSettings, search

    path = project(tmp_path, models, budget=3)
    lines = []

    def stop_at_the_second(line: str) -> None:
        lines.append(line)
        if len(lines) == 2:
            raise KeyboardInterrupt
    with pytest.raises(Interrupted) as caught:
        search(path, tmp_path / "out", SearchSettings(cache_dir=tmp_path / "cache", progress=stop_at_the_second))
    assert (caught.value.finished, caught.value.budget) == (2, 3)
    resumed = []
    report = search(path, tmp_path / "out", SearchSettings(cache_dir=tmp_path / "cache", progress=resumed.append))
    assert [line.split()[1] for line in resumed] == ["2"]
    assert [t["number"] for t in report.data["trials"]] == [0, 1, 2]


def test_bad_search_folders(models, tmp_path, capsys):
    path = project(tmp_path, models, budget=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["search", str(path), "-o", str(tmp_path / "full")]) == 1
    assert "error[E265]" in capsys.readouterr().err and (tmp_path / "full" / "notes.txt").exists()
    plain = tmp_path / "plain.brick"
    plain.write_text(f'model a:\n  source: hf "{tmp_path / "models" / "a"}"\noutput: a\n')
    assert main(["search", str(plain), "-o", str(tmp_path / "none")]) == 1
    assert "error[E263]" in capsys.readouterr().err and not (tmp_path / "none").exists()
