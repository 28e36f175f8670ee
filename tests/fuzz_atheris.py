"""Coverage-guided fuzzing of `cfmc check` with atheris (libFuzzer), on demand.

    pip install atheris            # the `fuzz` extra; CPU wheels for CPython 3.11
    python tests/fuzz_atheris.py -runs=100000 [-max_len=4096] [CORPUS_DIR]

Each input is written as the bytes of a .brick file and checked through the real
command line entry point, rendering its diagnostics as text and as JSON. Any exit other
than 0 or 1 (an internal error: a traceback) stops the run with the input; libFuzzer
saves it as fuzz-artifacts/crash-* (slow inputs as slow-unit-*). The corpus starts from the golden files and examples. Real tiny
models are built once in a temporary directory, so programs that name `models/a` and
`models/b` reach the checks past the parser.
"""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["cfmlang"]):
    from cfmlang.cli import main

HERE = Path(__file__).parent
WORK = Path(tempfile.mkdtemp(prefix="cfm-atheris-"))
PROGRAM = WORK / "f.brick"


def seed_corpus(folder: Path) -> None:
    """Golden programs and examples, with `models/...` paths that exist here."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((HERE / "golden").rglob("*.brick")) + sorted((HERE.parent / "examples").glob("*.brick"))
    for index, source in enumerate(sources):
        (folder / f"seed-{index:03d}").write_bytes(source.read_bytes())


def build_models() -> None:
    sys.path.insert(0, str(HERE))
    from models import tiny_model

    tiny_model(WORK / "models" / "a", seed=1)
    tiny_model(WORK / "models" / "b", seed=2)
    tiny_model(WORK / "models" / "llama_a", seed=1)
    tiny_model(WORK / "models" / "llama_b", seed=2)


def check(data: bytes) -> None:
    PROGRAM.write_bytes(data)
    for form in ([], ["--format", "json"]):
        sink = io.StringIO()
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            code = main(["check", *form, str(PROGRAM)])
        if code not in (0, 1):
            raise RuntimeError(f"exit {code}:\n{sink.getvalue()}")


if __name__ == "__main__":
    build_models()
    args = sys.argv
    if not any(a.startswith("-artifact_prefix=") for a in args):
        args = args + [f"-artifact_prefix={Path.cwd() / 'fuzz-artifacts'}/"]
        (Path.cwd() / "fuzz-artifacts").mkdir(exist_ok=True)
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = WORK / "corpus"
        seed_corpus(corpus)
        args = args + [str(corpus)]
    atheris.Setup(args, check)
    atheris.Fuzz()
