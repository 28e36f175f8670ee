"""The output policy of `cfmc` with stderr not a terminal: progress lines (a heartbeat
during long phases), no third-party warnings or bars unless `--verbose`, summaries that
count what was run and written."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cfmlang.cli.progress import Heartbeat
from models import tiny_model, tiny_tokenizer
from paths import REPO

THIRD_PARTY = re.compile(r"Warning|warn\(|warnings\.warn|Could not find a config file|it/s\]|%\|")

PROGRAM = """model base:
  source: hf "base"
brick tone:
  kind: lora
  base: base
  train: {data: "data.jsonl", steps: 4, rank: 2, lr: 0.05, seed: 1, batch_size: 2, targets: [q_proj, v_proj]}
model tuned:
  from: base
  attach: [tone]
output: tuned
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-output")
    tiny_tokenizer(tiny_model(root / "base", seed=5))
    lines = [f'{{"prompt": "a {word}", "response": "the sea {word}"}}' for word in ("poem", "story", "code", "loop")]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    (root / "tuned.brick").write_text(PROGRAM)
    return root


def cfmc(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`cfmc ARGS` in a subprocess whose stderr is a pipe, with its own cache."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "CFM_CACHE_DIR": str(project / "cache"), "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "cfmlang", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)


def third_party_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if THIRD_PARTY.search(line)]


def test_every_command_is_quiet_about_third_parties_and_says_what_it_did(project):
    compiled = cfmc(project, "compile", "tuned.brick", "-o", "out")
    assert compiled.returncode == 0, compiled.stderr
    assert third_party_lines(compiled.stderr) == []
    lines = compiled.stderr.splitlines()
    assert "`tone`: running" in lines and "`tuned`: running" in lines
    assert any(line.startswith("training tone: step 4/4") for line in lines)
    assert re.search(r"wrote out: \d+ tensors, [\d.]+ MB in 1 file\(s\); 2 node\(s\) run, 1 source\(s\) read, "
                     r"0 from the cache", lines[-1])
    again = cfmc(project, "compile", "tuned.brick", "-o", "again")
    assert again.stderr.splitlines()[-1].endswith("(linked from the cache); 0 node(s) run, 0 source(s) read, "
                                                  "1 from the cache")
    for args in (["check", "tuned.brick"], ["plan", "tuned.brick"], ["graph", "tuned.brick"], ["methods"],
                 ["cache", "ls"], ["run", "out", "--prompt", "a poem", "--no-chat", "--max-new-tokens", "3"]):
        done = cfmc(project, *args)
        assert done.returncode == 0, (args, done.stderr)
        assert third_party_lines(done.stderr + done.stdout) == [], args


def test_verbose_shows_what_is_otherwise_kept_out(project):
    """The filter is what keeps the warnings out: `--verbose` lets them through."""
    quiet = cfmc(project, "compile", "tuned.brick", "-o", "quiet", "--no-cache")
    verbose = cfmc(project, "compile", "tuned.brick", "-o", "verbose", "--no-cache", "--verbose")
    assert quiet.returncode == verbose.returncode == 0
    assert third_party_lines(quiet.stderr) == [] and third_party_lines(verbose.stderr) != []


def test_heartbeat_prints_a_line_while_a_phase_says_nothing():
    stream = io.StringIO()
    with Heartbeat(enabled=True, stream=stream, interval=0.2) as beat:
        beat.log("`x`: running")
        beat.note("writing the output: 1.0 of 2.0 MB")
        time.sleep(0.75)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "`x`: running"
    beats = [line for line in lines[1:] if line.startswith("still working (")]
    assert len(beats) >= 2 and beats == lines[1:]
    assert all(line.endswith("s): writing the output: 1.0 of 2.0 MB") for line in beats)


def test_no_heartbeat_on_a_terminal_or_when_quiet():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    for stream, enabled in ((Terminal(), True), (io.StringIO(), False)):
        with Heartbeat(enabled=enabled, stream=stream, interval=0.05):
            time.sleep(0.2)
        assert stream.getvalue() == ""
