"""Every example compiles as written."""
from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cfmlang

EXAMPLES = Path(__file__).parents[1] / "examples"
TINY_EXAMPLES = ["linear.brick", "task_arithmetic.brick", "nested.brick"]


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("examples")
    make = runpy.run_path(str(EXAMPLES / "make_tiny_models.py"))["make"]
    make(folder / "models")
    for name in TINY_EXAMPLES:
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


def test_method_reference_is_generated_from_the_registry():
    """docs/methods.md is `cfmc methods` output: regenerate it when methods change."""
    from cfmlang.stdlib.catalogue import methods_markdown

    docs = (EXAMPLES.parent / "docs" / "methods.md").read_text()
    assert docs == methods_markdown() + "\n", "run: cfmc methods > docs/methods.md"


@pytest.mark.parametrize("name", ["smol_french.brick", "smol_pirate.brick"])
def test_smol_lora_examples_check(name):
    """The SmolLM2 training examples check (data validated, GGUF metadata read; training
    SmolLM2 is left to `cfmc compile`)."""
    program = cfmlang.check(EXAMPLES / name)
    node = program.node(program.output)
    assert node.data.samples == 24 and len(node.modules) == 2 * 30
