"""`cfmc import`: mergekit YAML -> .brick, checked, compiled and compared with mergekit 0.1.5."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import cfmlang
from cfmlang.cli import main
from cfmlang.diagnostics import CompileError
from cfmlang.frontend.format import format_source
from cfmlang.importers.mergekit import import_file, translate
from mergekit_oracle import run_mergekit, tensors

MODELS = "models:\n  - model: /m/a\n  - model: /m/b\nparameters: {weight: 1}\n"
MODELS_ONLY = "merge_method: linear\n" + MODELS


@dataclass(frozen=True)
class Case:
    name: str
    yaml: str                 # with {a} {b} {c}: tiny Llama models a, b, c
    method: str
    filters: bool = False     # uses mergekit conditional parameters
    compare: str = ""         # a reason not to compare with mergekit bit for bit, or ""
    rounds: str = ""          # a reason mergekit's output is compared after casting to ours
    keyword: str = "merge"    # the statement it translates to (`grow` for stacked slices)

    @property
    def node(self) -> str:
        return "stacked" if self.keyword == "grow" else "merged"


CASES = [
    Case("linear", """\
merge_method: linear
models:
  - model: {a}
    parameters:
      weight: 0.3
  - model: {b}
    parameters:
      weight: [0.9, 0.1]
parameters:
  normalize: true
dtype: float32
""", "linear"),
    # global parameters are defaults for every model; models keep their YAML order
    Case("linear_defaults", """\
merge_method: linear
models:
  - model: {c}
    parameters:
      weight: 2
  - model: {a}
  - model: {b}
    parameters:
      weight: [0.2, 1.0]
parameters:
  weight: 0.5
  normalize: false
dtype: float32
""", "linear"),
    # linear ignores `base_model` as a base: mergekit merges it as one more input
    Case("linear_base", """\
merge_method: linear
base_model: {c}
models:
  - model: {a}
  - model: {b}
parameters:
  weight: 1.0
""", "linear"),
    # one slice whose sources all span the whole model is a plain merge
    Case("linear_whole_slice", """\
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
        parameters:
          weight: [1, 0]
      - model: {b}
        layer_range: [0, 4]
    parameters:
      weight: 0.25
merge_method: linear
dtype: float32
""", "linear"),
    Case("task_arithmetic", """\
merge_method: task_arithmetic
base_model: {a}
models:
  - model: {a}
  - model: {b}
    parameters:
      weight: [1.0, 0.2, 0.5]
  - model: {c}
    parameters:
      weight: 0.4
parameters:
  lambda: 0.8
  normalize: true
dtype: float32
""", "task_arithmetic"),
    Case("ties", """\
merge_method: ties
base_model: {a}
models:
  - model: {a}
  - model: {b}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 0.5
  - model: {c}
    parameters:
      density: 0.5
      weight: [0.2, 0.8]
parameters:
  normalize: true
  int8_mask: true
dtype: float32
""", "ties"),
    Case("ties_filters", """\
merge_method: ties
base_model: {a}
models:
  - model: {b}
    parameters:
      density: 0.6
      weight:
        - filter: mlp
          value: 0.3
        - filter: self_attn
          value: [0.1, 0.9]
  - model: {c}
    parameters:
      density: 0.5
parameters:
  weight: 0.5
  normalize: true
dtype: float32
""", "ties", filters=True),
    # density 1 keeps every delta: the random drop cannot match mergekit's RNG draws
    Case("dare_ties", """\
merge_method: dare_ties
base_model: {a}
models:
  - model: {b}
    parameters:
      density: 1.0
      weight: [0.3, 0.7]
  - model: {c}
    parameters:
      density: 1.0
      weight: 0.5
parameters:
  int8_mask: true
  normalize: true
dtype: float32
""", "dare_ties"),
    Case("dare_ties_random", """\
merge_method: dare_ties
base_model: {a}
models:
  - model: {b}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {c}
    parameters:
      density: 0.53
      weight: 0.4
parameters:
  int8_mask: true
dtype: float32
""", "dare_ties", compare="DARE drops at random: cfmlang's seeded draws differ from mergekit's"),
    Case("slerp", """\
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t: [0, 0.5, 1]
dtype: float32
""", "slerp"),
    # the classic slerp example: a whole-model slice with filtered `t` gradients
    Case("slerp_filtered", """\
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""", "slerp", filters=True),
    # the shape of mergekit's examples/bio-merge.yml: TIES without normalisation, fp16 output
    Case("ties_half_unnormalised", """\
models:
  - model: {b}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {c}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {a}
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""", "ties"),
    # the shape of mergekit's examples/arcee_fusion.yml
    Case("arcee_fusion", """\
models:
  - model: {a}
  - model: {b}
merge_method: arcee_fusion
base_model: {a}
dtype: bfloat16
""", "arcee_fusion", rounds="mergekit 0.1.5 writes arcee_fusion in float32 whatever `dtype` says"),
    Case("passthrough", """\
merge_method: passthrough
models:
  - model: {a}
    parameters:
      scale: 0.5
dtype: float32
""", "passthrough"),
    # mergekit's orcamini-platy-44layer.yml, on tiny models: passthrough slices stack layers
    Case("passthrough_stack", """\
slices:
  - sources:
    - model: {a}
      layer_range: [0, 3]
  - sources:
    - model: {b}
      layer_range: [1, 4]
merge_method: passthrough
dtype: float16
""", "stack", keyword="grow"),
    # per-source, per-slice and global `scale`, with filters and a gradient
    Case("passthrough_stack_scaled", """\
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
        parameters:
          scale:
            - filter: o_proj
              value: 0.0
            - filter: down_proj
              value: [0.25, 1.0]
  - sources:
      - model: {c}
        layer_range: [3, 4]
    parameters:
      scale: 0.5
  - sources:
      - model: {a}
        layer_range: [2, 4]
parameters:
  scale: 2.0
dtype: float32
""", "stack", keyword="grow"),
]


def write_case(case: Case, zoo, folder: Path) -> Path:
    path = folder / f"{case.name}.yml"
    path.write_text(case.yaml.format(a=zoo["llama_a"], b=zoo["llama_b"], c=zoo["llama_c"]))
    return path


def translated(case: Case, zoo, folder: Path) -> tuple[Path, Path]:
    """The YAML file and the .brick file translated from it, side by side."""
    config = write_case(case, zoo, folder)
    brick = folder / f"{case.name}.brick"
    import_file(config, brick)
    return config, brick


def case_param(case: Case):
    return pytest.param(case, id=case.name)


@pytest.mark.parametrize("case", [case_param(c) for c in CASES])
def test_translation_checks(case, tiny_zoo, tmp_path):
    _, brick = translated(case, tiny_zoo, tmp_path)
    assert format_source(brick.read_text()) == brick.read_text()   # printed in the canonical layout
    program = cfmlang.check(brick)
    assert program.output == case.node
    assert program.node(case.node).method == case.method


@pytest.mark.parametrize("case", [case_param(c) for c in CASES if not c.compare])
def test_compiles_bit_identical_to_mergekit(case, tiny_zoo, tmp_path):
    config, brick = translated(case, tiny_zoo, tmp_path)
    cfmlang.compile(brick, tmp_path / "ours")
    ours = tensors(tmp_path / "ours")
    theirs = run_mergekit(yaml.safe_load(config.read_text()), tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name in sorted(ours):
        if case.rounds:
            theirs[name] = theirs[name].to(ours[name].dtype)
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name


def test_the_random_case_translates_but_is_not_compared():
    assert [c.name for c in CASES if c.compare] == ["dare_ties_random"]


MEGA = next(c for c in CASES if c.name == "slerp_filtered").yaml + """\
out_path: {stage}
---
models:
  - model: {stage}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {c}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {a}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
out_path: ./models/gradient-slerp-ties
"""


def test_a_two_stage_mega_config_compiles_like_mergekit_run_twice(tiny_zoo, tmp_path):
    """mergekit's examples/mega.yml on tiny models: the second document merges the first's
    output (`out_path`), which becomes a node reference."""
    stage = tmp_path / "models" / "gradient-slerp"
    config = MEGA.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"], c=tiny_zoo["llama_c"], stage=stage)
    text = translate(config, "mega.yml")
    assert text.count("\nmodel ") == 3 and "merge gradient_slerp:\n  method: slerp" in text
    assert "merge merged:\n  method: ties" in text and "    gradient_slerp: {density: [1, 0.7, 0.1]" in text
    assert text.endswith("output: merged\n")
    (tmp_path / "mega.brick").write_text(text)
    cfmlang.compile(tmp_path / "mega.brick", tmp_path / "ours")
    first, second = (dict(d) for d in yaml.safe_load_all(config))
    run_mergekit({k: v for k, v in first.items() if k != "out_path"}, stage)
    theirs = run_mergekit({k: v for k, v in second.items() if k != "out_path"}, tmp_path / "mk")
    ours = tensors(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for name in sorted(ours):
        assert torch.equal(ours[name], theirs[name]), name


def test_multimerge_names_and_the_final_unnamed_document():
    config = """\
name: first
merge_method: linear
models: [{model: /m/a}, {model: /m/b}]
parameters: {weight: 1}
---
merge_method: task_arithmetic
base_model: /m/a
models: [{model: first}, {model: /m/c}]
parameters: {weight: 0.5}
---
name: unused_name
merge_method: linear
models: [{model: /m/b}, {model: /m/c}]
parameters: {weight: 1}
"""
    text = translate(config, "multi.yml")
    assert "merge first:\n" in text and "merge unused_name:\n" in text and "merge merged:\n" in text
    assert "  inputs: [first, c]" in text and text.endswith("output: merged\n")
    found = problems(config.replace("name: unused_name\n", ""))
    assert [(code, line, col) for code, line, col, _ in found] == [("E100", 11, 1)]
    assert "2 documents have no `name:`" in found[0][3]


# ---- the emitted text -------------------------------------------------------------------------

def expected(text: str, zoo) -> str:
    return text.format(a=zoo["llama_a"], b=zoo["llama_b"], c=zoo["llama_c"])


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def test_text_of_a_linear_merge(tiny_zoo, tmp_path):
    _, brick = translated(case("linear"), tiny_zoo, tmp_path)
    assert brick.read_text() == expected("""\
# Imported from `linear.yml` (a mergekit configuration) by `cfmc import`.
model llama_a:
  source: hf "{a}"
model llama_b:
  source: hf "{b}"
merge merged:
  method: linear
  normalize: true
  inputs:
    llama_a: {{weight: 0.3}}
    llama_b: {{weight: [0.9, 0.1]}}
  dtype: float32
output: merged
""", tiny_zoo)


def test_text_of_defaults_and_an_appended_base(tiny_zoo, tmp_path):
    _, brick = translated(case("linear_defaults"), tiny_zoo, tmp_path)
    text = brick.read_text()
    assert "  weight: 0.5\n  normalize: false\n  inputs:\n    llama_c: {weight: 2}\n" \
           "    llama_a: {}\n    llama_b: {weight: [0.2, 1.0]}\n" in text
    _, brick = translated(case("linear_base"), tiny_zoo, tmp_path)
    text = brick.read_text()
    assert "base:" not in text and "  weight: 1.0\n  inputs: [llama_a, llama_b, llama_c]\n" in text


def test_text_of_a_whole_model_slice(tiny_zoo, tmp_path):
    _, brick = translated(case("linear_whole_slice"), tiny_zoo, tmp_path)
    assert "  weight: 0.25\n  inputs:\n    llama_a: {weight: [1, 0]}\n    llama_b: {}\n" in brick.read_text()


def test_text_of_task_arithmetic_drops_the_base_from_inputs(tiny_zoo, tmp_path):
    _, brick = translated(case("task_arithmetic"), tiny_zoo, tmp_path)
    assert "  base: llama_a\n  lambda: 0.8\n  normalize: true\n  inputs:\n" \
           "    llama_b: {weight: [1.0, 0.2, 0.5]}\n    llama_c: {weight: 0.4}\n" in brick.read_text()


def test_text_of_slerp_with_filtered_t(tiny_zoo, tmp_path):
    _, brick = translated(case("slerp_filtered"), tiny_zoo, tmp_path)
    assert brick.read_text() == expected("""\
# Imported from `slerp_filtered.yml` (a mergekit configuration) by `cfmc import`.
model llama_a:
  source: hf "{a}"
model llama_b:
  source: hf "{b}"
merge merged:
  method: slerp
  base: llama_a
  t: {{self_attn: [0, 0.5, 0.3, 0.7, 1], mlp: [1, 0.5, 0.7, 0.3, 0], default: 0.5}}
  inputs: [llama_b]
  dtype: float32
output: merged
""", tiny_zoo)


def test_text_of_a_filter_list_without_catch_all_falls_back_to_the_global_value(tiny_zoo, tmp_path):
    # mergekit: no filter of the model's list matches -> the global `weight: 0.5` applies
    _, brick = translated(case("ties_filters"), tiny_zoo, tmp_path)
    assert brick.read_text() == expected("""\
# Imported from `ties_filters.yml` (a mergekit configuration) by `cfmc import`.
model llama_a:
  source: hf "{a}"
model llama_b:
  source: hf "{b}"
model llama_c:
  source: hf "{c}"
merge merged:
  method: ties
  base: llama_a
  weight: 0.5
  normalize: true
  inputs:
    llama_b: {{density: 0.6, weight: {{mlp: 0.3, self_attn: [0.1, 0.9], default: 0.5}}}}
    llama_c: {{density: 0.5}}
  dtype: float32
output: merged
""", tiny_zoo)


def test_filter_details():
    text = translate("""\
merge_method: linear
models:
  - model: /m/x
    parameters:
      weight: {filter: "layers.0.", value: 2}
  - model: /m/y
    parameters:
      weight:
        - filter: mlp
          value: 1
        - filter: mlp
          value: 3
        - filter: "*"
          value: 4
        - value: 5
parameters:
  weight: [{value: 1e-3}]
  normalize: "yes"
""")
    assert '    x: {weight: {"layers.0.": 2, default: 0.001}}\n' in text
    assert "    y: {weight: {mlp: 1, default: 4}}\n" in text
    assert "  weight: 0.001\n" in text            # YAML 1.1 reads 1e-3 as text; mergekit as a number
    assert '  normalize: "yes"\n' in text         # a quoted string stays a string
    assert "# note: a repeated `mlp` filter" in text and "after the catch-all" in text


def test_settings_that_need_nothing():
    text = translate(MODELS_ONLY + "tokenizer_source: base\ndtype: torch.bfloat16\nout_dtype: bfloat16\n"
                     "chat_template: null\nbase_model: null\n")
    assert "  dtype: bfloat16\n" in text and "  tokenizer: base\n" in text and "base:" not in text
    # in a slice, mergekit's linear does not use the base model: left out, and said so
    text = translate("merge_method: linear\nbase_model: /m/c\nslices:\n  - sources:\n"
                     "      - model: /m/a\n        layer_range: [0, 4]\nparameters: {weight: 1}\n")
    assert "/m/c" not in text.split("# note: `base_model`")[1] and "inputs: [a]" in text


def test_names_are_sanitised_and_unique():
    text = translate("""\
merge_method: linear
models:
  - model: org/Mistral-7B-v0.1
  - model: other/Mistral-7B-v0.1
  - model: ./7b
  - model: x/true
  - model: x/merged
parameters: {weight: 1}
""", cwd="/nonexistent")
    assert "model Mistral_7B_v0_1:\n  source: hf \"org/Mistral-7B-v0.1\"\n" in text
    assert "model Mistral_7B_v0_1_2:\n  source: hf \"other/Mistral-7B-v0.1\"\n" in text
    assert "model m_7b:\n" in text and "model true_:\n" in text and "model merged_2:\n" in text
    assert "merge merged:\n" in text and text.endswith("output: merged\n")   # node names come first
    assert "is not a local directory (a Hugging Face hub id?)" in text


def test_relative_paths_are_rewritten_when_the_file_goes_elsewhere(tiny_zoo, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_zoo["llama_a"], tmp_path / "models" / "a")
    shutil.copytree(tiny_zoo["llama_b"], tmp_path / "models" / "b")
    (tmp_path / "cfg.yml").write_text("merge_method: linear\nmodels:\n  - model: models/a\n"
                                      "  - model: models/b\nparameters:\n  weight: 1\n")
    monkeypatch.chdir(tmp_path)
    here = import_file("cfg.yml")
    assert 'source: hf "models/a"' in here and "resolved from this file's directory" in here
    out = Path("out") / "sub" / "cfg.brick"
    elsewhere = import_file("cfg.yml", out)
    assert 'source: hf "../../models/a"' in elsewhere and 'source: hf "../../models/b"' in elsewhere
    assert "rewritten relative to this file's directory" in elsewhere
    assert out.read_text() == elsewhere
    assert cfmlang.check(out).node("merged").method == "linear"
    assert cfmlang.check(tmp_path / "out" / "sub" / "cfg.brick")   # from any directory
    same_dir = import_file("cfg.yml", "cfg.brick")
    assert 'source: hf "models/a"' in same_dir


# ---- what cannot be translated ------------------------------------------------------------------

def problems(text: str) -> list[tuple[str, int, int, str]]:
    with pytest.raises(CompileError) as exc:
        translate(text, "c.yml", cwd="/nonexistent")
    return [(d.code, d.span.line if d.span else 0, d.span.col if d.span else 0,
             d.message + " | " + " ".join(d.help)) for d in exc.value.diagnostics]


def one(text: str) -> tuple[int, int, str]:
    found = problems(text)
    assert len(found) == 1, found
    code, line, col, message = found[0]
    assert code == "E100"
    return line, col, message



def test_text_of_stacked_slices(tiny_zoo, tmp_path):
    _, brick = translated(case("passthrough_stack_scaled"), tiny_zoo, tmp_path)
    assert brick.read_text().split("\n", 1)[1] == expected("""\
model llama_a:
  source: hf "{a}"
model llama_c:
  source: hf "{c}"
grow stacked:
  method: stack
  dtype: float32
  slices:
    - {{from: llama_a.layers[0:2], scale: {{o_proj: 0.0, down_proj: [0.25, 1.0], default: 2.0}}}}
    - {{from: llama_c.layers[3:4], scale: 0.5}}
    - {{from: llama_a.layers[2:4], scale: 2.0}}
output: stacked
""", tiny_zoo)


def test_stacked_slices_problems(tiny_zoo):
    found = problems(f"""\
merge_method: passthrough
slices:
  - sources:
      - model: /m/a
        layer_range: [0, 24]
      - model: /m/b
        layer_range: [0, 24]
  - sources:
      - model: {tiny_zoo["llama_a"]}
        layer_range: [2, 9]
        parameters: {{weight: 0.5}}
  - sources:
      - model: /m/b
        layer_range: [3, 3]
    residual_weight: 0.1
""")
    assert [(code, line, col) for code, line, col, _ in found] == [
        ("E100", 3, 5), ("E100", 10, 22), ("E100", 11, 22), ("E100", 14, 22), ("E100", 15, 5)]
    messages = [m for *_, m in found]
    assert "a `passthrough` slice with 2 sources" in messages[0]
    assert "goes past the 4 layers" in messages[1] and "the last layer is 3" in messages[1]
    assert "a `weight` parameter of `passthrough`" in messages[2] and "only `scale`" in messages[2]
    assert "takes no layers" in messages[3]
    assert "`residual_weight` of a slice" in messages[4]


def test_several_slices_of_another_method():
    line, col, message = one("""\
merge_method: linear
slices:
  - sources:
      - model: /m/a
        layer_range: [0, 24]
  - sources:
      - model: /m/b
        layer_range: [8, 32]
""")
    assert (line, col) == (2, 1)
    assert "`linear` over 2 output slices" in message and "`method: stack`" in message


def test_one_slice_with_different_ranges():
    line, col, message = one("""\
merge_method: linear
slices:
  - sources:
      - model: /m/a
        layer_range: [0, 4]
      - model: /m/b
        layer_range: [2, 6]
""")
    assert (line, col) == (7, 22)
    assert "different layers ([0, 4] and [2, 6])" in message and "`method: stack`" in message


def test_a_slice_of_part_of_the_model(tiny_zoo):
    a, b = tiny_zoo["llama_a"], tiny_zoo["llama_b"]
    slice_yaml = ("merge_method: linear\nslices:\n  - sources:\n      - model: {a}\n        layer_range: {r}\n"
                  "      - model: {b}\n        layer_range: {r}\nparameters: {{weight: 1}}\n")
    line, col, message = one(slice_yaml.format(a=a, b=b, r="[0, 2]"))
    assert (line, col) == (5, 22) and "takes 2 of the 4 layers" in message
    line, col, message = one(slice_yaml.format(a=a, b=b, r="[1, 4]"))
    assert (line, col) == (5, 22) and "takes a part of the model" in message
    assert "inputs:" in translate(slice_yaml.format(a=a, b=b, r="[0, 4]"))
    # unreadable config.json: assumed whole, and said so
    assert "is taken to be the whole model" in translate(slice_yaml.format(a="/m/a", b="/m/b", r="[0, 4]"))


@pytest.mark.parametrize("snippet,line,col,words", [
    ("merge_method: frankenmerge\n" + MODELS, 1, 15, "merge method `frankenmerge` has no cfmlang equivalent"),
    ("merge_method: lienar\n" + MODELS, 1, 15, "did you mean `linear`?"),
    ("merge_method: linear\n" + MODELS + "modules:\n  text_decoder: {}\n", 6, 1, "`modules:`"),
    ("merge_method: linear\n" + MODELS + "tokenizer:\n  source: /m/z\n", 7, 11,
     "the tokenizer model `/m/z` is not one of the merged models"),
    ("merge_method: linear\n" + MODELS + "tokenizer_source: /m/z\n", 6, 19, "`/m/z` is not one of the merged"),
    ("merge_method: linear\n" + MODELS + "tokenizer:\n  tokens: {a: {source: {kind: mean}}}\n", 7, 24,
     "token source kind `mean`"),
    ("merge_method: linear\n" + MODELS + "chat_template: zephyr\n", 6, 16, "chat template `zephyr`"),
    ("merge_method: linear\n" + MODELS + "dtype: float16\nout_dtype: bfloat16\n", 7, 1,
     "`out_dtype: bfloat16` differs from `dtype: float16`"),
    ("merge_method: linear\n" + MODELS + "out_dtype: bfloat16\n", 6, 1, "differs from `dtype: (inputs)`"),
    ("merge_method: linear\n" + MODELS + "dtype: int64\n", 6, 8, "dtype `int64`"),
    ("merge_method: linear\nmodels:\n  - model: /m/a+/m/lora\n  - model: /m/b\n", 3, 12,
     "a LoRA reference (`model+lora`)"),
    ("merge_method: linear\nmodels:\n  - model: {model: /m/a, lora: /m/l}\n", 3, 26, "a LoRA reference"),
    ("merge_method: linear\nmodels:\n  - model: org/a@v2\n", 3, 12, "a hub revision"),
    ("merge_method: linear\nmodels:\n  - model: /m/a\n    paramters: {weight: 1}\n", 4, 5,
     "unknown key `paramters` in a `models` entry | did you mean `parameters`?"),
    ("merge_method: linear\nbase_mdoel: /m/a\n" + MODELS, 2, 1, "did you mean `base_model`?"),
    ("merge_method: linear\n" + MODELS + "parameters: {weight: 2}\n", 6, 1, "key `parameters` is given twice"),
    ("merge_method: linear\nmodels:\n  - model: /m/a\n  - model: /m/a\n", 4, 12, "`/m/a` is listed twice"),
    ("merge_method: linear\nmodels:\n  - model: /m/a\n    parameters:\n      weight: []\n", 5, 15,
     "an empty list has no value"),
    ("merge_method: linear\nmodels:\n  - model: /m/a\n    parameters:\n      weight: .inf\n", 5, 15,
     "non-finite number"),
    ("merge_method: linear\nmodels:\n  - model: /m/a\n    parameters:\n      weight: [[1]]\n", 5, 15,
     "a list of lists"),
    ("merge_method: linear\nmodels:\n  - model: /m/a\n    parameters:\n      weight: {filter: default, value: 1}\n",
     5, 24, "a filter named `default`"),
    ("merge_method: linear\nmodels:\n  - model: /m/a\n    parameters:\n      weight: {filter: mlp}\n",
     5, 15, "a conditional parameter without `value:`"),
    ("merge_method: linear\nmodels:\n  - model: /m/a\n    parameters:\n      seed: 3\n", 5, 7,
     "a parameter named `seed`"),
    ("merge_method: linear\nslices:\n  - sources:\n      - model: /m/a\n        layer_range: [0, 4]\n"
     "    residual_weight: 0.1\n", 6, 5, "`residual_weight`"),
    ("merge_method: linear\n", 1, 1, "neither `models:` nor `slices:`"),
    ("models:\n  - model: /m/a\n", 1, 1, "no `merge_method:`"),
    ("- merge_method: linear\n", 1, 1, "a mergekit config must be a mapping"),
    ("", 1, 1, "holds no mergekit configuration"),
])
def test_each_untranslatable_item_is_e100_at_its_position(snippet, line, col, words):
    found_line, found_col, message = one(snippet)
    assert (found_line, found_col) == (line, col), message
    assert words in message


def test_all_problems_are_reported_together_sorted():
    found = problems("""\
merge_method: frankenmerge
slices:
  - sources:
      - model: /m/a
        layer_range: [0, 24]
  - sources:
      - model: /m/b+/m/lora
        layer_range: [8, 32]
tokenizer_source: 3
dtype: float16
out_dtype: bfloat16
modules: {}
""")
    assert [(code, line, col) for code, line, col, _ in found] == [
        ("E100", 1, 15), ("E100", 2, 1), ("E100", 7, 16), ("E100", 9, 19), ("E100", 11, 1), ("E100", 12, 1)]


def test_tokenizer_and_chat_template_settings_are_translated():
    text = translate("merge_method: task_arithmetic\nbase_model: /m/a\nmodels:\n  - model: /m/b\n"
                     "    parameters: {weight: 0.5}\ntokenizer:\n  source: union\n  pad_to_multiple_of: 8\n"
                     "  tokens:\n    <|im_start|>: {source: /m/b}\n    <x>: {source: {kind: zero}, force: true}\n"
                     "    <y>: {source: {kind: model_token, model: /m/a, token: <s>}}\nchat_template: chatml\n")
    assert ('  tokenizer: {source: union, pad_to_multiple_of: 8, tokens: {"<|im_start|>": {source: b}, '
            '"<x>": {source: {kind: zero}, force: true}, '
            '"<y>": {source: {kind: model_token, model: a, token: "<s>"}}}}\n') in text
    assert "  chat_template: chatml\n" in text and "# note: `chat_template: chatml` is cfmlang's own" in text
    text = translate(MODELS_ONLY + "tokenizer_source: /m/b\nchat_template: \"{{ messages }}\"\n")
    assert "  tokenizer: b\n" in text and '  chat_template: "{{ messages }}"\n' in text


def test_yaml_syntax_error_is_e101_with_its_position():
    found = problems("merge_method: linear\nmodels: [/m/a, /m/b\nparameters: {weight: 1}\n")
    assert len(found) == 1
    code, line, col, message = found[0]
    assert (code, line, col) == ("E101", 3, 11) and message.startswith("invalid YAML: expected ',' or ']'")
    found = problems("merge_method: linear\n  bad: indent\n")
    assert found[0][:2] == ("E101", 2)


# ---- the command line ------------------------------------------------------------------------------

@pytest.fixture
def config_file(tiny_zoo, tmp_path) -> Path:
    return write_case(case("linear"), tiny_zoo, tmp_path)


def test_cli_prints_the_program_and_exits_0(config_file, capsys):
    assert main(["import", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Imported from `linear.yml`") and out.endswith("output: merged\n")


def test_cli_untranslatable_exits_1_with_rustc_style_text(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: linear\nmodels:\n  - model: /m/a+/m/lora\n")
    assert main(["import", str(bad), "-o", str(tmp_path / "bad.brick")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{bad}:3:12: error[E100]: cannot translate: a LoRA reference (`model+lora`)" in captured.err
    assert "3 |   - model: /m/a+/m/lora\n  |            ^^^^^^^^^^^^\n" in captured.err
    assert not (tmp_path / "bad.brick").exists()
    assert main(["import", "--format", "json", str(bad)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [(d["code"], d["span"]["line"], d["span"]["col"]) for d in data["diagnostics"]] == [("E100", 3, 12)]


def test_cli_yaml_error_and_missing_file_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("models: [a, b\n")
    assert main(["import", str(bad)]) == 1
    assert "error[E101]: invalid YAML" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "nope.yml")]) == 1
    assert "error[E040]" in capsys.readouterr().err


def test_cli_output_file_force_and_refusal(config_file, tmp_path, capsys):
    out = tmp_path / "mix.brick"
    assert main(["import", str(config_file), "-o", str(out)]) == 0
    assert capsys.readouterr().err.strip() == f"wrote {out}"
    first = out.read_text()
    assert cfmlang.check(out).node("merged").method == "linear"
    out.write_text("# mine\n")
    assert main(["import", str(config_file), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error[E082]: refusing to overwrite" in err and "--force" in err
    assert out.read_text() == "# mine\n"
    assert main(["import", str(config_file), "-o", str(out), "--force"]) == 0
    assert out.read_text() == first
    assert main(["import", str(config_file), "-o", str(tmp_path)]) == 1
    assert "it is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cli_output_relative_to_another_directory(tiny_zoo, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(tiny_zoo["llama_a"], tmp_path / "a")
    (tmp_path / "cfg.yml").write_text("merge_method: passthrough\nmodels:\n  - model: a\n")
    monkeypatch.chdir(tmp_path)
    assert main(["import", "cfg.yml", "-o", os.path.join("deep", "er", "p.brick")]) == 0
    text = (tmp_path / "deep" / "er" / "p.brick").read_text()
    assert 'source: hf "../../a"' in text
    assert main(["check", str(tmp_path / "deep" / "er" / "p.brick")]) == 0
