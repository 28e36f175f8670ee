"""The `cfmc` command line: exit codes, diagnostics formats, graph output, atomic writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cfmlang.cli import main

MERGE = """model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
model unused:
  source: hf "{a}"
merge mix:
  method: linear
  inputs:
    a: {{weight: 0.5}}
    b: {{weight: {wb}}}
output: mix
"""


@pytest.fixture
def merge_file(tiny_zoo, tmp_path) -> Path:
    path = tmp_path / "mix.brick"
    path.write_text(MERGE.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"], wb=0.5))
    return path


def test_check_ok_reports_dropped_node_as_warning(merge_file, capsys):
    assert main(["check", str(merge_file)]) == 0
    err = capsys.readouterr().err
    assert "warning[W001]" in err and "`unused`" in err


def test_check_error_exit_1_with_rustc_style_text(tmp_path, capsys):
    bad = tmp_path / "bad.brick"
    bad.write_text("model a:\n  sorce: hf \"x\"\n")
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2:3: error[E013]: unknown key `sorce` in model `a`" in err
    assert "2 |   sorce: hf \"x\"" in err and "  |   ^^^^^" in err
    assert "= help: did you mean `source`?" in err


def test_check_json_format(tmp_path, capsys):
    bad = tmp_path / "bad.brick"
    bad.write_text("merge m:\n  method: linera\n  inputs: [x]\n")
    assert main(["check", "--format", "json", str(bad)]) == 1
    data = json.loads(capsys.readouterr().out)
    codes = [(d["code"], d["span"]["line"], d["span"]["col"]) for d in data["diagnostics"]]
    assert codes == [("E030", 2, 11)]
    assert data["diagnostics"][0]["help"] == ["did you mean `linear`?"]


def test_missing_file_is_a_user_error(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.brick")]) == 1
    assert "error[E040]" in capsys.readouterr().err


def test_graph_formats(merge_file, capsys):
    assert main(["graph", str(merge_file), "--format", "json"]) == 0
    graph = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in graph["nodes"]] == ["a", "b", "mix"]
    assert graph["edges"] == [["a", "mix"], ["b", "mix"]]
    assert main(["graph", str(merge_file), "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph cfm {") and '"a" -> "mix";' in dot and "unused" not in dot
    assert main(["graph", str(merge_file), "--format", "mermaid"]) == 0
    assert "  a --> mix" in capsys.readouterr().out


def test_compile_then_failing_compile_leaves_old_artifact_intact(merge_file, tiny_zoo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(merge_file), "-o", str(out), "-q"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # weights summing to zero with normalize: division by zero -> inf/NaN in the first tensor
    merge_file.write_text(MERGE.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"], wb=-0.5))
    capsys.readouterr()
    assert main(["compile", str(merge_file), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{merge_file}:7:1: error[E080]: merge `mix` produced NaN or infinite values in tensor " \
        "`lm_head.weight`" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_compile_json_summary(merge_file, tmp_path, capsys):
    assert main(["compile", str(merge_file), "-o", str(tmp_path / "o"), "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == ["model.safetensors"] and summary["tensors"] == 39


def test_internal_error_exit_2_without_traceback(merge_file, tmp_path, monkeypatch, capsys):
    import cfmlang.ops.base

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cfmlang.ops.base, "write_sharded", broken)
    assert main(["compile", str(merge_file), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: boom" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert main(["compile", str(merge_file), "-o", str(tmp_path / "o"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_console_script_sigint_leaves_nothing(merge_file, tmp_path):
    """A real `cfmc` process interrupted while writing leaves no output and no temp dir."""
    script = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"   # a background shell ignores SIGINT
        "import cfmlang.artifact.write as art\n"
        "real = art.write_shard\n"
        "def slow(path, specs, produce, on_tensor, chunk_bytes):\n"
        "    def hook(spec):\n"
        "        on_tensor(spec)\n"
        "        if spec.name.endswith('layers.2.mlp.up_proj.weight'):\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "    real(path, specs, produce, hook, chunk_bytes)\n"
        "art.write_shard = slow\n"
        "from cfmlang.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "interrupted"
    proc = subprocess.run([sys.executable, "-c", script, "compile", str(merge_file), "-o", str(out), "-q"],
                          capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 130, proc.stderr
    assert "interrupted; nothing was written" in proc.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".interrupted")] == []


def test_compile_refuses_to_replace_foreign_directory_or_file(merge_file, tmp_path, capsys):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["compile", str(merge_file), "-o", str(foreign)]) == 1
    assert "error[E082]" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["compile", str(merge_file), "-o", str(a_file)]) == 1
    assert "error[E082]" in capsys.readouterr().err and a_file.read_text() == "x"


def test_disk_full_is_a_diagnostic_and_writes_nothing(merge_file, tmp_path):
    """Writes past a file-size limit fail with EFBIG, as on a full disk."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "from cfmlang.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "full"
    proc = subprocess.run([sys.executable, "-c", script, "compile", str(merge_file), "-o", str(out), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "error[E081]: cannot write the output" in proc.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".full")] == []
