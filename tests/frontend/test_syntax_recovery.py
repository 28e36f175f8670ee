"""Syntax-error recovery reports the error of every statement, keeps the statements that
parse for the checker, and its cost grows linearly with the number of statements (it
once padded statement k with k newlines)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import time

import pytest

import cfmlang
from cfmlang.diagnostics import CompileError
from cfmlang.frontend.parser import parse_tree
from cfmlang.frontend.to_ast import parse_recovering
from paths import TESTS

ROOT = TESTS.parent


def program_with_errors(statements: int) -> str:
    """`statements` declarations; every 100th lacks its `:`."""
    lines = []
    for index in range(statements):
        colon = "" if index % 100 == 50 else ":"
        lines += [f"model m{index}{colon}", f'  source: hf "models/m{index}"']
    return "\n".join(lines) + "\n"


def recovery_seconds(statements: int) -> float:
    text = program_with_errors(statements)
    start = time.process_time()            # CPU time: other processes on a loaded machine count little
    with pytest.raises(CompileError) as info:
        parse_tree(text, "big.brick")
    seconds = time.process_time() - start
    assert [d.span.line for d in info.value.diagnostics] == [2 * i + 1 for i in range(50, statements, 100)]
    return seconds


def test_every_statements_error_is_reported_where_it_is():
    with pytest.raises(CompileError) as info:
        parse_tree(program_with_errors(300), "f.brick")
    assert [(d.code, d.span.line, d.span.col) for d in info.value.diagnostics] == \
        [("E002", 101, 10), ("E002", 301, 11), ("E002", 501, 11)]


def test_recovery_time_grows_linearly():
    recovery_seconds(100)   # warm the parser
    small = min(recovery_seconds(250) for _ in range(3))
    large = min(recovery_seconds(2000) for _ in range(2))
    assert large / small < 12, f"8x the statements took {large / small:.1f}x the time"


def test_the_statements_that_parse_are_kept_and_the_others_named():
    program = parse_recovering(program_with_errors(300) + "output m50\nmerge x:\n  inputs: [m1,\nmodel y:\n", "f.brick")
    assert [s.name for s in program.statements] == [f"m{i}" for i in range(300) if i % 100 != 50]
    assert program.statements[1].name_span.line == 3          # positions are those of the file
    assert [(b.keyword, b.name, b.span.line) for b in program.broken] == [
        ("model", "m50", 101), ("model", "m150", 301), ("model", "m250", 501),
        ("output", None, 601), ("merge", "x", 602), ("model", "y", 604)]   # y: inside x's open bracket
    assert [(d.code, d.span.line) for d in program.problems] == [
        ("E002", 101), ("E002", 301), ("E002", 501), ("E002", 601), ("E002", 604)]


def checked_with_errors(statements: int) -> tuple[float, list]:
    """Check (resolve included) `statements` models, every 100th without its `:`, and a
    merge of every 7th of them: the syntax errors, the checker's errors of the others
    (their sources do not exist) and no unknown name for the broken ones."""
    text = program_with_errors(statements) + "merge all:\n  method: linear\n  inputs: [" + \
        ", ".join(f"m{i}" for i in range(0, statements, 7)) + "]\noutput: m50\n"
    gc.collect()
    gc.disable()                           # its passes land on whichever run crosses a threshold
    start = time.process_time()            # CPU time: other processes on a loaded machine count little
    try:
        with pytest.raises(CompileError) as info:
            cfmlang.check(text)
    finally:
        seconds = time.process_time() - start
        gc.enable()
    return seconds, info.value.diagnostics


def test_checking_past_syntax_errors_grows_linearly():
    _, diagnostics = checked_with_errors(200)
    broken = [2 * i + 1 for i in range(50, 200, 100)]
    assert [d.span.line for d in diagnostics if d.code == "E002"] == broken
    assert [d.span.line for d in diagnostics if d.code == "E050"] == [2 * i + 2 for i in range(200) if 2 * i + 1 not in broken]
    assert "E020" not in {d.code for d in diagnostics}
    small = min(checked_with_errors(200)[0] for _ in range(3))
    large = min(checked_with_errors(1600)[0] for _ in range(2))
    assert large / small < 12, f"8x the statements took {large / small:.1f}x the time"


def test_a_closed_pipe_ends_cfmc_quietly(tmp_path):
    """`cfmc check --format json | head -c 100`: far more JSON than a pipe holds, and the
    reader leaves after 100 bytes; cfmc stops with 141 and no traceback."""
    source = tmp_path / "many.brick"
    source.write_text("".join(f"model m{i}\n" for i in range(3000)))
    script = (f'{sys.executable} -m cfmlang check --format json {source} 2>{tmp_path / "err"} | head -c 100 >/dev/null;'
              ' echo "${PIPESTATUS[0]}"')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "141"
    assert (tmp_path / "err").read_text() == ""


def test_program_text_that_is_not_text_is_a_diagnostic():
    """`cfmlang.check` on a Python string with a lone surrogate (which UTF-8 cannot encode)
    or a NUL character: E143 at its line and column, not a UnicodeEncodeError."""
    import cfmlang

    for text, what in (('model a:\n  source: hf "\ud800"\n', "lone surrogate U+D800"),
                       ('model a:\n  source: hf "a\0"\n', "NUL character")):
        with pytest.raises(CompileError) as info:
            cfmlang.check(text)
        (found,) = info.value.diagnostics
        assert found.code == "E143" and what in found.message
        assert (found.span.line, found.span.col) == (2, 15 if "\ud800" in text else 16)
