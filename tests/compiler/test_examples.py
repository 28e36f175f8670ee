"""Every example compiles as written."""
from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cfmlang
from paths import REPO

EXAMPLES = REPO / "examples"
TINY_EXAMPLES = ["linear.brick", "task_arithmetic.brick", "nested.brick"]


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("examples")
    make = runpy.run_path(str(EXAMPLES / "make_tiny_models.py"))["make"]
    make(folder / "models")
    for name in TINY_EXAMPLES + ["grow.brick"]:
        shutil.copy(EXAMPLES / name, folder / name)
    return folder


@pytest.mark.parametrize("name", TINY_EXAMPLES)
def test_example_compiles_and_loads(example_dir, name, tmp_path):
    result = cfmlang.compile(example_dir / name, tmp_path / "out")
    model = result.module
    logits = model.float()(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()


def test_nested_example_equals_its_formula(example_dir, tmp_path):
    cfmlang.compile(example_dir / "nested.brick", tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    base, math, code = (load_file(example_dir / "models" / n / "model.safetensors")
                        for n in ("base", "math", "code"))
    for name, value in out.items():
        expected = base[name] + 0.5 * ((math[name] + code[name]) / 2 - base[name])
        torch.testing.assert_close(value, expected)


def test_smol_example_and_std_import_check():
    program = cfmlang.check(EXAMPLES / "smol.brick")
    assert program.output == "smol" and program.node("smol").arch.num_layers == 30
    via_std = cfmlang.check('import "std/smollm2.brick"\noutput: smollm2\n')
    assert via_std.node("smollm2").arch.hidden_size == 576


def test_grow_example_records_each_verified_step(example_dir, tmp_path):
    result = cfmlang.compile(example_dir / "grow.brick", tmp_path / "out")
    nodes = result.manifest["nodes"]
    assert [nodes[n]["verify"]["reference"] for n in ("pro", "wide", "moe")] == ["base", "pro", "wide"]
    assert all(nodes[n]["verify"]["max_abs_logit_diff"] <= 1e-4 for n in ("pro", "wide", "moe"))
    model = result.module
    assert model.config.num_hidden_layers == 8 and model.config.num_local_experts == 4
    logits = model.float()(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()


def test_smol_grow_example_checks():
    program = cfmlang.check(EXAMPLES / "smol_grow.brick")
    assert program.node("pro").arch.num_layers == 35
    assert program.node("pro").arch.new_layers == (6, 13, 20, 27, 34)


def test_smol_experts_example_checks():
    program = cfmlang.check(EXAMPLES / "smol_experts.brick")
    experts = program.node("experts")
    assert program.output == "half" and experts.count == 24 and len(experts.layers) == 30
    assert program.node("half").k == 12


def test_method_reference_is_generated_from_the_registry():
    """docs/methods.md is `cfmc methods` output: regenerate it when methods change."""
    from cfmlang.ops.catalogue import methods_markdown

    docs = (EXAMPLES.parent / "docs" / "methods.md").read_text()
    assert docs == methods_markdown() + "\n", "run: cfmc methods > docs/methods.md"


@pytest.mark.parametrize("name", ["smol_french.brick", "smol_pirate.brick"])
def test_smol_lora_examples_check(name):
    """The SmolLM2 training examples check (data validated, GGUF metadata read; training
    SmolLM2 is left to `cfmc compile`)."""
    program = cfmlang.check(EXAMPLES / name)
    node = program.node(program.output)
    assert node.data.samples == 24 and len(node.modules) == 2 * 30


def test_smol_search_example_checks():
    """The SmolLM2 search example checks as a search (no training: `cfmc search` and
    examples/smol_search.py run it; its numbers are in docs/language.md's section)."""
    opened = cfmlang.check_search(EXAMPLES / "smol_search.brick")
    assert [d.name for d in opened.dimensions] == ["voices.inputs.french_smol.weight",
                                                    "voices.inputs.pirate_smol.weight"]
    assert opened.search.target == "voices" and [t.metric for t in opened.search.objective.tasks] == ["nll", "nll"]
    assert all("heldout" not in t.task for t in opened.search.objective.tasks)    # judged on data it never saw
