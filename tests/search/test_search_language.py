"""`search(...)`, `one_of(...)` and the `search` statement: parsing, cfmc fmt, the checker
(every value checked at each end of its range), located errors, and what `cfmc compile`
and the language server make of a search."""
from __future__ import annotations

import pytest
from lsprotocol import types

from cfmlang.api import check, check_search
from cfmlang.cli import main
from cfmlang.diagnostics import CompileError
from cfmlang.frontend import ast
from cfmlang.frontend.format import format_source
from cfmlang.frontend.to_ast import parse
from cfmlang.lsp.analysis import analyze
from cfmlang.lsp.completion import complete
from cfmlang.lsp.hover import hover

PROGRAM = """model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
merge blend:
  method: {method}
  base: a
  inputs:
    b: {{weight: {weight}, density: {density}}}
{rest}"""
SEARCH = """search best:
  target: blend
  objective:
    minimize:
      - {task: "prose", weight: 1}
  budget: 4
"""


def program(tmp_path, zoo, method="one_of(ties, dare_ties)", weight="search(0.0, 1.0)",
            density="search(0.1, 0.9, log)", rest=SEARCH):
    path = tmp_path / "search.brick"
    path.write_text(PROGRAM.format(a=zoo["llama_a"], b=zoo["llama_b"], method=method, weight=weight,
                                   density=density, rest=rest))
    return path


def codes(path) -> list[tuple[str, int, int]]:
    with pytest.raises(CompileError) as caught:
        check_search(path)
    return [(d.code, d.span.line if d.span else 0, d.span.col if d.span else 0) for d in caught.value.diagnostics]


def test_open_values_parse_and_format():
    text = "merge m:\n  method:   one_of( ties,dare_ties )\n  inputs: {a: {weight: search(0, 1.5 ,log)}}\n"
    call = parse(text).statements[0].body.get("method").value
    assert isinstance(call, ast.Call) and call.name == "one_of" and [a.name for a in call.args] == ["ties", "dare_ties"]
    assert format_source(text) == ("merge m:\n  method: one_of(ties, dare_ties)\n"
                                   "  inputs: {a: {weight: search(0, 1.5, log)}}\n")


def test_a_search_checks_and_names_its_values(tiny_zoo, tmp_path, capsys):
    opened = check_search(program(tmp_path, tiny_zoo))
    assert [(d.name, d.kind) for d in opened.dimensions] == [
        ("blend.method", "choice"), ("blend.inputs.b.weight", "float"), ("blend.inputs.b.density", "float")]
    assert opened.dimensions[2].log and opened.search.sampler == "cmaes" and opened.search.budget == 4
    assert opened.checked.node("blend").method == "ties"            # every value at its first candidate
    assert main(["check", str(program(tmp_path, tiny_zoo))]) == 0
    assert "ok (3 nodes; search `best` over 3 value(s))" in capsys.readouterr().err


def test_each_end_of_a_range_is_checked_and_the_error_says_which(tiny_zoo, tmp_path):
    # `linear` takes no `base:` and no density: only the second choice is wrong
    path = program(tmp_path, tiny_zoo, method="one_of(ties, linear)")
    with pytest.raises(CompileError) as caught:
        check_search(path)
    found = caught.value.diagnostics
    assert {d.code for d in found} == {"E013"} and all(d.span.line in (7, 9) for d in found)
    assert all("with `blend.method` = linear (line 6)" in d.notes[-1] for d in found)
    # a density above 1 is refused at the upper end of its range
    path = program(tmp_path, tiny_zoo, density="search(0.5, 1.5)")
    assert codes(path) == [("E032", 9, 44)]


@pytest.mark.parametrize("weight, code, message", [
    ("search(1.0, 0.5)", "E261", "the range of `search` is empty"),
    ("search(0.0, 1.0, log)", "E261", "a log-scale range must be above 0"),
    ("search(0.0, 1.0, linear)", "E261", "the third argument of `search` can only be `log`"),
    ("search(0.5)", "E261", "`search` takes two numbers"),
    ("serch(0.0, 1.0)", "E261", "unknown function `serch`"),
    ("one_of(0.5)", "E261", "`one_of` needs at least two choices"),
    ("one_of(0.5, 0.5)", "E261", "`0.5` is given twice"),
    ("one_of([1], 2)", "E261", "`one_of` chooses between"),
    ("search(search(0, 1), 1)", "E261", "`search(...)` inside `search(...)`"),
])
def test_malformed_values_are_located(tiny_zoo, tmp_path, weight, code, message):
    path = program(tmp_path, tiny_zoo, weight=weight)
    with pytest.raises(CompileError) as caught:
        check_search(path)
    found = caught.value.diagnostics
    assert [(d.code, d.span.line) for d in found] == [(code, 9)], found      # the checker does not repeat it
    assert message in found[0].message and found[0].span.col >= 17


@pytest.mark.parametrize("statement, message", [
    ("search best:\n  target: blnd\n  objective: {minimize: [prose]}\n", "unknown node `blnd`"),
    ("search best:\n  target: blend\n", "needs an `objective:`"),
    ("search best:\n  target: blend\n  objective: {minimize: [prose]}\n  sampler: cmaez\n", "unknown sampler `cmaez`"),
    ("search best:\n  target: blend\n  objective: {minimize: [prose]}\n  budget: 0\n", "`budget` must be"),
    ("search best:\n  target: blend\n  objective: {minimise: [prose]}\n", "unknown key `minimise`"),
    ("search best:\n  target: blend\n  objective: {minimize: [{task: prose, metric: acc}]}\n",
     "has no metric `acc`"),
    ("search best:\n  target: blend\n  objective: {minimize: [{task: prose, weight: 0}]}\n",
     "`weight` must be a number other than 0"),
    ("search best:\n  target: blend\n  objective: {minimize: [prose]}\n  budjet: 3\n", "unknown key `budjet`"),
])
def test_bad_search_statements(tiny_zoo, tmp_path, statement, message):
    with pytest.raises(CompileError) as caught:
        check_search(program(tmp_path, tiny_zoo, rest=statement))
    found = caught.value.diagnostics
    assert {d.code for d in found} == {"E262"} and all(d.span.line >= 10 for d in found)
    assert any(message in d.message for d in found), found


def test_unknown_task_file_is_the_eval_diagnostic_at_the_task(tiny_zoo, tmp_path):
    statement = 'search best:\n  target: blend\n  objective: {minimize: ["nowhere.txt"]}\n'
    with pytest.raises(CompileError) as caught:
        check_search(program(tmp_path, tiny_zoo, rest=statement))
    problem = caught.value.diagnostics[0]
    assert problem.code == "E230" and (problem.span.line, problem.span.col) == (12, 26)


def test_open_values_without_a_search_or_outside_its_target(tiny_zoo, tmp_path):
    assert codes(program(tmp_path, tiny_zoo, rest="")) == [("E260", 6, 11), ("E260", 9, 17), ("E260", 9, 44)]
    # `other` is not read by the target
    other = "merge other:\n  method: linear\n  inputs: {a: {weight: search(0.0, 1.0)}}\n" + SEARCH
    assert codes(program(tmp_path, tiny_zoo, rest=other)) == [("E260", 12, 24)]
    seeded = SEARCH + "seed: one_of(1, 2)\n"
    assert codes(program(tmp_path, tiny_zoo, rest=seeded)) == [("E260", 16, 7)]
    twice = SEARCH + SEARCH.replace("search best", "search again")
    assert ("E263", 16, 8) in codes(program(tmp_path, tiny_zoo, rest=twice))
    nothing = program(tmp_path, tiny_zoo, method="ties", weight="0.5", density="0.5")
    assert codes(nothing) == [("E263", 10, 8)]


def test_compile_refuses_a_search_with_the_command_to_use(tiny_zoo, tmp_path, capsys):
    path = program(tmp_path, tiny_zoo)
    with pytest.raises(CompileError) as caught:
        check(path)
    assert [d.code for d in caught.value.diagnostics] == ["E264"]
    assert main(["compile", str(path), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error[E264]: this program describes a search (`search best`)" in err and "cfmc search FILE -o DIR" in err
    assert not (tmp_path / "out").exists()
    assert main(["compile", str(program(tmp_path, tiny_zoo, rest="")), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error[E264]: this program describes a search (3 open value(s))" in err
    assert "add a `search NAME:` statement" in err


def test_language_server_on_a_search(tiny_zoo, tmp_path):
    path = program(tmp_path, tiny_zoo)
    text = path.read_text()
    analysis = analyze(text, str(path))
    assert analysis.diagnostics == () and analysis.checked is not None
    # hover on a parameter of a merge whose method is a choice: the first choice's docs
    shown = hover(analysis, types.Position(line=8, character=36))
    assert shown is not None and "density" in shown.contents.value
    # completion of the search statement's keys and of its samplers
    lines = text.splitlines()
    labels = {i.label for i in complete(analysis, text + "  \n", types.Position(line=len(lines), character=2))}
    assert {"target", "objective", "budget", "seed", "sampler"} <= labels
    labels = {i.label for i in complete(analysis, text + "  sampler: \n",
                                        types.Position(line=len(lines), character=11))}
    assert labels == {"cmaes", "tpe", "random"}
    broken = analyze(text.replace("search(0.0, 1.0)", "search(1.0, 0.0)"), str(path))
    assert [d.code for d in broken.diagnostics] == ["E261"]
