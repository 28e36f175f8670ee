"""`cfmc fmt` / format_source: one canonical layout, comments kept, idempotent, and the
formatted program means the same (the same AST without spans; for programs that check,
the same IR).

Run over every example, every golden file that parses, and (a property test) the fuzzer's
programs (its valid program, its mutations, its grammar-aware generator's programs)
decorated with comments and blank lines; every example and golden program is canonical."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import cfmlang
from cfmlang.cli import main
from cfmlang.compiler.check import check
from cfmlang.frontend.resolve import resolve
from cfmlang.diagnostics import CompileError, Span
from cfmlang.frontend.format import _comment_column, format_source, print_program
from cfmlang.frontend.to_ast import parse
from paths import TESTS
from test_fuzz import model_sources, mutations, programs, valid_text
from test_golden import golden_models, place  # noqa: F401  (fixtures)

ROOT = TESTS.parent
EXAMPLES = sorted((ROOT / "examples").rglob("*.brick")) + sorted((ROOT / "cfmlang" / "frontend" / "std").glob("*.brick"))
GOLDEN = sorted((TESTS / "golden").rglob("*.brick"))
OK = sorted((TESTS / "golden" / "ok").glob("*.brick"))


def without_spans(value):
    """A value's content with every span (and so every position) left out."""
    if isinstance(value, Span):
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__,) + tuple(
            (f.name, without_spans(getattr(value, f.name))) for f in dataclasses.fields(value)
            if not isinstance(getattr(value, f.name), Span))
    if isinstance(value, BaseModel):
        return (type(value).__name__, without_spans(value.model_dump()))
    if isinstance(value, dict):
        return tuple(sorted((repr(k), without_spans(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(without_spans(v) for v in value)
    return value


def comments(text: str) -> list[str]:
    found = []
    for line in text.replace("\r\n", "\n").split("\n"):
        column = _comment_column(line)
        if column is not None:
            found.append(line[column:].rstrip())
    return found


def assert_formats_faithfully(text: str) -> str:
    formatted = format_source(text)
    assert format_source(formatted) == formatted, "not idempotent"
    assert without_spans(parse(formatted).statements) == without_spans(parse(text).statements)
    assert comments(formatted) == comments(text)
    assert formatted.endswith("\n") and "\n\n\n" not in formatted and "\t" not in formatted
    return formatted


def parses(path: Path) -> bool:
    try:
        parse(path.read_text(), str(path))
    except CompileError:
        return False
    return True


@pytest.mark.parametrize("path", EXAMPLES + [p for p in GOLDEN if parses(p)], ids=lambda p: p.name)
def test_examples_and_golden_files_format_faithfully(path):
    assert_formats_faithfully(path.read_text())


def test_examples_and_golden_programs_are_canonical(capsys):
    """`cfmc fmt --check` passes on every example, standard-library file and golden
    program that checks or compiles (golden error files may be laid out as a user would)."""
    canonical = EXAMPLES + OK + sorted((TESTS / "golden" / "artifacts").glob("*.brick"))
    assert main(["fmt", "--check", *map(str, canonical)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("source", OK, ids=lambda p: p.name)
def test_formatted_golden_programs_check_to_the_same_ir(source, place):  # noqa: F811
    case = place(source)
    before = cfmlang.check(case)
    case.write_text(format_source(case.read_text()))
    after = cfmlang.check(case)
    assert without_spans(after.nodes) == without_spans(before.nodes)
    assert (after.output, after.seed, after.dtype) == (before.output, before.seed, before.dtype)
    assert [w.code for w in after.warnings] == [w.code for w in before.warnings]


@pytest.mark.parametrize("path", EXAMPLES + OK, ids=lambda p: p.name)
def test_programs_built_as_an_ast_print_in_the_canonical_layout(path):
    """print_program (what `cfmc import` emits through) of a file's AST: the same AST,
    already in the canonical layout."""
    statements = parse(path.read_text()).statements
    printed = print_program(statements, ["a comment", ""])
    assert printed.startswith("# a comment\n#\n")
    assert without_spans(parse(printed).statements) == without_spans(statements)
    assert format_source(printed) == printed


def test_the_canonical_layout():
    messy = ('# head\n\n\n'
             'merge  pair :   # soup\n\n'
             '  method:    linear\n'
             '  inputs: [ math ,code, ]\n'
             '     # about deep\n'
             '  deep:\n'
             '      - {a:1,b : [1,2],}\n'
             '      -  b.layers[ 0 : +2 ][ * ].mlp   # trailing\n'
             '  more: [\n'
             '     a,   # on a\n'
             '     "s", {w: 1,\n'
             '       v: 2}\n'
             '  ]\n'
             'output:y')
    assert format_source(messy) == ('# head\n\n'
                                    'merge pair:  # soup\n'
                                    '  method: linear\n'
                                    '  inputs: [math, code]\n'
                                    '  # about deep\n'
                                    '  deep:\n'
                                    '    - {a: 1, b: [1, 2]}\n'
                                    '    - b.layers[0:2][*].mlp  # trailing\n'
                                    '  more: [\n'
                                    '    a,  # on a\n'
                                    '    "s",\n'
                                    '    {\n'
                                    '      w: 1,\n'
                                    '      v: 2,\n'
                                    '    },\n'
                                    '  ]\n'
                                    'output: y\n')


def test_a_syntax_error_raises_the_checkers_diagnostic():
    with pytest.raises(CompileError) as info:
        format_source("model x\n  source: hf \"a\"\n", "f.brick")
    assert [(d.code, d.span.line) for d in info.value.diagnostics] == [("E002", 1)]


# ---------------------------------------------------------------- property test

@st.composite
def decorated(draw, text: str) -> str:
    """`text` with comments after some lines, comment lines and blank lines between
    some lines, and extra spaces after colons."""
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        choice = draw(st.integers(0, 7))
        if choice == 0:
            out.append(" " * draw(st.integers(0, 6)) + "# note " + str(len(out)))
        elif choice == 1:
            out.append("")
        if line.strip() and draw(st.integers(0, 3)) == 0 and _comment_column(line) is None:
            line += " " * draw(st.integers(0, 3)) + "#tail"
        out.append(line.replace(": ", ":   ") if draw(st.integers(0, 4)) == 0 else line)
    return "\n".join(out)


def checked(text: str) -> tuple:
    """What checking `text` gives: the IR (positions left out), settings and warnings of a
    valid program, or the codes of its diagnostics."""
    try:
        program = check(resolve(text, "<input>", Path.cwd()))
    except CompileError as exc:
        return ("errors", sorted(d.code for d in exc.diagnostics))
    return ("ok", without_spans(program.nodes), program.output, program.seed, program.dtype,
            sorted(w.code for w in program.warnings))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(data=st.data())
def test_generated_programs_format_faithfully(tiny_zoo, data):
    """The fuzzer's programs (its valid program, its mutations of it, and the
    grammar-aware generator's programs), decorated: every one that parses formats
    idempotently to the same AST, and checks to the same IR (or the same diagnostics)."""
    valid = valid_text(tiny_zoo)
    base = data.draw(st.one_of(st.just(valid), mutations(valid), programs(model_sources(tiny_zoo))))
    text = data.draw(decorated(base))
    try:
        parse(text)
    except CompileError:
        return   # not a program; the fuzz tests cover what happens to it
    formatted = assert_formats_faithfully(text)
    assert checked(formatted) == checked(text)


def test_the_fuzzers_valid_program_formats_to_the_same_ir(tiny_zoo):
    text = valid_text(tiny_zoo)
    assert checked(text)[0] == "ok"
    assert checked(assert_formats_faithfully(text)) == checked(text)


# ---------------------------------------------------------------- the command

def test_cfmc_fmt_check_diff_and_in_place(tmp_path, capsys):
    def cfmc(*args: str) -> SimpleNamespace:
        code = main(list(args))
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    messy, tidy, broken = tmp_path / "messy.brick", tmp_path / "tidy.brick", tmp_path / "broken.brick"
    messy.write_text("model a:\n    source:   hf \"m\"   # src\noutput:a\n")
    tidy.write_text("model a:\n  source: hf \"m\"\n")
    broken.write_text("model a:\n  source: hf \"m\"\nmodel b\n")
    messy.chmod(0o640)

    result = cfmc("fmt", "--check", str(messy), str(tidy))
    assert result.returncode == 1 and f"would reformat {messy}" in result.stderr and str(tidy) not in result.stderr
    assert cfmc("fmt", "--check", str(tidy)).returncode == 0

    result = cfmc("fmt", "--diff", str(messy))
    assert result.returncode == 0
    assert '-    source:   hf "m"   # src\n-output:a\n+  source: hf "m"  # src\n+output: a\n' in result.stdout
    assert messy.read_text().startswith("model a:\n    source")   # --diff writes nothing

    result = cfmc("fmt", str(broken), str(messy))
    assert result.returncode == 1 and f"{broken}:3:8: error[E002]" in result.stderr
    assert messy.read_text() == 'model a:\n  source: hf "m"  # src\noutput: a\n'
    assert messy.stat().st_mode & 0o777 == 0o640
    assert broken.read_text() == "model a:\n  source: hf \"m\"\nmodel b\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.brick", "messy.brick", "tidy.brick"]

    result = cfmc("fmt", "--check", str(tmp_path / "missing.brick"), str(tidy))
    assert result.returncode == 1 and "error[E040]: cannot read" in result.stderr and "internal error" not in result.stderr
