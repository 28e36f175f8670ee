"""The output policy of `cfmc` with stderr not a terminal: progress lines (a heartbeat
during long phases), no third-party warnings or bars unless `--verbose`, summaries that
count what was run and written."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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
SEARCH = PROGRAM.replace("output: tuned\n", """merge mix:
  method: linear
  inputs:
    base: {weight: search(0.2, 0.8)}
    tuned: {weight: 0.5}
search mix_weight:
  target: mix
  objective:
    minimize:
      - {task: "data.jsonl", metric: nll, weight: 1.0}
  budget: 2
  seed: 0
  sampler: random
""")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-output")
    tiny_tokenizer(tiny_model(root / "base", seed=5))
    lines = [f'{{"prompt": "a {word}", "response": "the sea {word}"}}' for word in ("poem", "story", "code", "loop")]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    (root / "tuned.brick").write_text(PROGRAM)
    (root / "mix.brick").write_text(SEARCH)
    return root


def cfmc(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`cfmc ARGS` in a subprocess whose stderr is a pipe, with its own cache."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "CFM_CACHE_DIR": str(project / "cache"), "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "cfmlang", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)


def third_party_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if THIRD_PARTY.search(line)]


@dataclass
class Timed:
    """A finished `cfmc` run: exit code, stdout, and each stderr line with the moment it
    arrived (seconds since the process started), then the moment it exited."""

    returncode: int
    stdout: str
    lines: list[tuple[float, str]]
    ended: float

    @property
    def stderr(self) -> str:
        return "".join(line + "\n" for _, line in self.lines)

    def longest_silence(self) -> float:
        """The longest time between two stderr lines, or between the last one and the exit
        (from the first line on: before it, Python imports cfmlang)."""
        moments = [at for at, _ in self.lines] + [self.ended]
        return max((b - a for a, b in zip(moments, moments[1:])), default=0.0)


def timed_cfmc(project: Path, *args: str, heartbeat: float = 1.0) -> Timed:
    """`cfmc ARGS` with stderr a pipe, read line by line as the process writes it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "CFM_CACHE_DIR": str(project / "cache"), "PYTHONWARNINGS": "default",
           "CFM_HEARTBEAT_SECONDS": str(heartbeat)}
    start = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "cfmlang", *args], cwd=project, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[tuple[float, str]] = []

    def read_stderr():
        for line in process.stderr:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
    reader = threading.Thread(target=read_stderr)
    reader.start()
    stdout = process.stdout.read()
    returncode = process.wait(timeout=600)
    ended = time.monotonic() - start
    reader.join()
    return Timed(returncode, stdout, lines, ended)


MAX_SILENCE = 30.0
"""With a heartbeat every second, the longest a command may be silent on a loaded machine
(the policy is a line at least every minute; the default heartbeat is 10 s)."""


@pytest.fixture(scope="module")
def extras(project) -> dict[str, Path]:
    """What the other commands read: an evaluation task, probes for `analyze`, a mergekit
    config, a lowered artifact for `bench`."""
    from planted import planted_model, write_probes

    (project / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"question": "the sea is", "choices": ["love", "night", "sky"], "answer": 1},
        {"question": "a poem of", "choices": ["verse", "code"], "answer": 0})))
    planted = planted_model(project / "planted")
    probes = write_probes(project / "probes", planted, per_ability=8)
    (project / "merge.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {project / 'base'}\n"
                                       f"    parameters: {{weight: 1.0}}\ndtype: float32\n")
    return {"planted": planted, "probes": probes}


def test_every_command_is_quiet_about_third_parties_and_never_silent_for_long(project, extras):
    """Each command, run as a CI job runs it (stderr a pipe): no third-party warning or bar,
    no silence longer than MAX_SILENCE once it has started talking, summaries that count
    what was run and written. (`cfmc lsp` talks the LSP protocol on stdout; it is tested
    in tests/lsp.)"""
    compiled = timed_cfmc(project, "compile", "tuned.brick", "-o", "out")
    assert compiled.returncode == 0, compiled.stderr
    lines = compiled.stderr.splitlines()
    assert "`tone`: running" in lines and "`tuned`: running" in lines
    assert any(line.startswith("training tone: step 4/4") for line in lines)
    assert re.search(r"wrote out: \d+ tensors, [\d.]+ MB in 1 file\(s\); 2 node\(s\) run, 1 source\(s\) read, "
                     r"0 from the cache", lines[-1])
    again = timed_cfmc(project, "compile", "tuned.brick", "-o", "again")
    assert again.stderr.splitlines()[-1].endswith("(linked from the cache); 0 node(s) run, 0 source(s) read, "
                                                  "1 from the cache")
    lowered = timed_cfmc(project, "compile", "tuned.brick", "-o", "lowered", "--target", "export")
    commands = [
        ["check", "tuned.brick"], ["plan", "tuned.brick"], ["graph", "tuned.brick"], ["methods"],
        ["fmt", "--diff", "tuned.brick"], ["import", "merge.yml"], ["cache", "ls"],
        ["run", "out", "--prompt", "a poem", "--no-chat", "--max-new-tokens", "3"],
        ["eval", "out", "--task", "mc.jsonl"],
        ["analyze", str(extras["planted"]), "-o", "report", "--probes", str(extras["probes"]), "--max-prompts", "8",
         "--levels", "0,50", "--cett", "0.2", "--eval-per-ability", "2", "--cett-tokens", "64"],
        ["bench", "lowered", "--batch", "1", "--prompt-tokens", "5", "--new-tokens", "3", "--repeat", "1"],
        ["search", "mix.brick", "-o", "searched"],
        ["cache", "clear"],
    ]
    runs = {"compile": compiled, "compile again": again, "compile --target export": lowered}
    for args in commands:
        runs[" ".join(args[:1])] = done = timed_cfmc(project, *args)
        assert done.returncode == 0, (args, done.stderr)
    for name, done in runs.items():
        assert third_party_lines(done.stderr + done.stdout) == [], name
        assert done.longest_silence() < MAX_SILENCE, (name, done.lines, done.ended)
    assert any(line.startswith("still working (") for done in runs.values() for _, line in done.lines)
    assert re.search(r"^trial 1 \[2/2\]: [0-9.]+; best ", runs["search"].stderr, re.M), runs["search"].stderr


def test_warnings_print_before_the_work_they_concern(project):
    """W001 (a dropped node) is known when the program is checked: it is printed before the
    first node runs (here: before the lora brick's training steps), not after the summary."""
    (project / "unused.brick").write_text(PROGRAM.replace("output: tuned", "model spare:\n  from: base\n"
                                                                          "  attach: [tone]\noutput: tuned"))
    done = timed_cfmc(project, "compile", "unused.brick", "-o", "unused", "--no-cache")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    warned = next(i for i, line in enumerate(lines) if "warning[W001]" in line and "`spare`" in line)
    trained = next(i for i, line in enumerate(lines) if line.startswith("training tone: step"))
    assert warned < trained < len(lines) - 1
    assert lines[-1].startswith("wrote unused:")
    assert sum("warning[W001]" in line for line in lines) == 1        # heartbeats do not repeat it


def test_the_heartbeat_interval_is_read_from_the_environment(monkeypatch):
    from cfmlang.cli.progress import HEARTBEAT_SECONDS, heartbeat_interval

    for value, expected in (("2.5", 2.5), ("0", HEARTBEAT_SECONDS), ("-1", HEARTBEAT_SECONDS),
                            ("inf", HEARTBEAT_SECONDS), ("nan", HEARTBEAT_SECONDS), ("soon", HEARTBEAT_SECONDS)):
        monkeypatch.setenv("CFM_HEARTBEAT_SECONDS", value)
        assert heartbeat_interval() == expected, value


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
