"""The artifact's model card (README.md): Hugging Face front matter carried from the
inputs, and the recipe (source, nodes' entries, input file hashes), byte-identical on rebuild."""
from __future__ import annotations

import hashlib
import json

import yaml

import cfmlang
from models import tiny_model

PROGRAM = """model math:
  source: hf "math"
model code:
  source: hf "code"
merge soup:
  method: ties
  base: math
  inputs:
    code: {weight: 0.7, density: 0.5}
output: soup
"""


def _card(folder):
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body, text


def _declare(folder, **meta):
    (folder / "README.md").write_text("---\n" + yaml.safe_dump(meta) + "---\n\n# a model\n")


def test_card_carries_inputs_metadata_and_the_recipe(tmp_path):
    math = tiny_model(tmp_path / "math", seed=1)
    code = tiny_model(tmp_path / "code", seed=2)
    _declare(math, license="apache-2.0", base_model="org/math-base")
    _declare(code, license="apache-2.0")
    config = json.loads((code / "config.json").read_text())
    (code / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/code-7b"}))
    (tmp_path / "soup.brick").write_text(PROGRAM)

    cfmlang.compile(tmp_path / "soup.brick", tmp_path / "out")
    meta, body, text = _card(tmp_path / "out")

    assert meta == {"base_model": ["org/code-7b", "org/math-base"], "license": "apache-2.0",
                    "library_name": "transformers", "tags": ["cfmlang", "merge"]}
    assert PROGRAM.rstrip() in body
    manifest = json.loads((tmp_path / "out" / "cfm.json").read_text())
    assert json.dumps({k: v for k, v in manifest["nodes"]["soup"].items() if k != "key"},
                      indent=2, sort_keys=True) in body
    assert '"method": "ties"' in body and '"density": 0.5' in body
    weights = hashlib.sha256((code / "model.safetensors").read_bytes()).hexdigest()
    assert f"| model.safetensors | `{weights}` |" in body
    assert hashlib.sha256(PROGRAM.encode()).hexdigest() in body
    assert "created" not in text

    cfmlang.compile(tmp_path / "soup.brick", tmp_path / "again", use_cache=False)
    assert (tmp_path / "again" / "README.md").read_text() == text


def test_mixed_or_unknown_licenses_are_other_and_listed(tmp_path):
    math = tiny_model(tmp_path / "math", seed=1)
    tiny_model(tmp_path / "code", seed=2)
    _declare(math, license="mit")
    (tmp_path / "soup.brick").write_text(PROGRAM)

    cfmlang.compile(tmp_path / "soup.brick", tmp_path / "out")
    meta, body, _ = _card(tmp_path / "out")

    assert meta["license"] == "other"
    assert "base_model" not in meta
    assert "### math: hf \"math\"\n\nLicense: mit" in body


def test_program_given_as_text_gets_a_card(tmp_path):
    tiny_model(tmp_path / "math", seed=1)
    tiny_model(tmp_path / "code", seed=2)
    text = PROGRAM.replace('"math"', f'"{tmp_path / "math"}"').replace('"code"', f'"{tmp_path / "code"}"')

    cfmlang.compile(text, tmp_path / "out")
    _, body, _ = _card(tmp_path / "out")

    assert hashlib.sha256(text.encode()).hexdigest() in body and "given to cfmlang.compile as text" in body
