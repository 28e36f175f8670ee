"""cfmlang is extended from outside: tests/extension_example.py registers a merge method,
a grow method, an update method and a router, with no edit to cfmlang. Each one checks
(parameter errors located at the offending value), plans, compiles to the numbers its
definition gives, is served from the cache on a second compile, is listed by
`cfmc methods`, and is named in the manifest."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cfmlang
from cfmlang.diagnostics import CompileError
from cfmlang.ops.catalogue import methods_markdown
from cfmlang.ops.experts.routers import NEEDS_DATA, ROUTER_BUILDERS
from cfmlang.ops.registry import REGISTRY
from cfmlang.runtime.routed_mlp import ROUTER_LOADERS
from models import layer_index, tiny_model, tiny_tokenizer

NEW_METHODS = (("merge", "scaled_mean"), ("grow", "repeat_last"), ("update", "shrink"))


@pytest.fixture(scope="module")
def extension():
    """Import the extension; afterwards take its registrations back out, so that the
    rest of the suite sees cfmlang's own registry."""
    module = importlib.import_module("extension_example")
    yield module
    for key in NEW_METHODS:
        REGISTRY.pop(key, None)
    ROUTER_BUILDERS.pop("first", None)
    ROUTER_LOADERS.pop("first", None)
    NEEDS_DATA.discard("first")
    sys.modules.pop("extension_example", None)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extend")
    tiny_tokenizer(tiny_model(root / "a", seed=1))
    tiny_model(root / "b", seed=2)
    tiny_model(root / "c", seed=3)
    (root / "facts.jsonl").write_text(json.dumps({"prompt": "the sky of the sea", "subject": "sea",
                                                  "target": " poem"}) + "\n")
    return root


HEAD = 'model a:\n  source: hf "a"\nmodel b:\n  source: hf "b"\nmodel c:\n  source: hf "c"\n'
PROGRAMS = {
    "scaled_mean": "merge m:\n  method: scaled_mean\n  base: a\n  inputs: [b, c]\n  scale: {}\noutput: m\n",
    "repeat_last": "grow m:\n  method: repeat_last\n  from: a\n  copies: {}\noutput: m\n",
    "shrink": ('update m:\n  method: shrink\n  from: a\n  facts: "facts.jsonl"\n  layer: 1\n  strength: {}\n'
               "  report_tokens: 2\noutput: m\n"),
    "first": ("brick e:\n  kind: experts\n  from: a.layers[*].mlp\n  split: random\n  count: 4\n"
              "route m:\n  method: topk\n  experts: e\n  router: {}\n  k: 1\noutput: m\n"),
}
GOOD = {"scaled_mean": "0.5", "repeat_last": "2", "shrink": "0.25", "first": "first"}
BAD = {"scaled_mean": ("5", "scale"), "repeat_last": ("0", "copies"), "shrink": ("1.5", "strength"),
       "first": ("firts", "router")}


def write(models: Path, name: str, value: str) -> Path:
    path = models / f"{name}.brick"
    path.write_text(HEAD + PROGRAMS[name].format(value))
    return path


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_bad_parameters_are_located(extension, models, name):
    value, key = BAD[name]
    path = write(models, name, value)
    with pytest.raises(CompileError) as info:
        cfmlang.check(path)
    found = [d for d in info.value.diagnostics if d.code == "E032"]
    assert found and key in found[0].message
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(key + ":"))
    assert found[0].span.line == line and found[0].span.file == str(path)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_plans_compiles_caches_and_records(extension, models, name, tmp_path):
    path = write(models, name, GOOD[name])
    cache = tmp_path / "cache"
    plan = cfmlang.plan(path, cache_dir=cache)
    assert plan.node("m").status == "run"
    first = cfmlang.compile(path, tmp_path / "one", cache_dir=cache)
    again = cfmlang.compile(path, tmp_path / "two", cache_dir=cache)
    assert again.plan.node("m").status == "cached" and "m" not in again.stats
    entry = first.manifest["nodes"]["m"]
    assert entry.get("method", entry.get("router")) == name or entry.get("router") == name
    CHECKS[name](models, tmp_path / "two", first.manifest)


@pytest.mark.parametrize("keyword,name", NEW_METHODS)
def test_listed_by_cfmc_methods(extension, keyword, name):
    assert f"| `{name}` |" in methods_markdown()


def test_router_listed_by_cfmc_methods(extension):
    assert "| `first` | Always the first experts of the layer. |" in methods_markdown()


# ---- what each compiled output must hold ----------------------------------------------

def merged(models: Path, out: Path, manifest: dict) -> None:
    a, b, c = (load_file(models / n / "model.safetensors") for n in "abc")
    result = load_file(out / "model.safetensors")
    for name, value in result.items():
        expected = a[name].double() + 0.5 * ((b[name].double() - a[name]) + (c[name].double() - a[name])) / 2
        torch.testing.assert_close(value, expected.float(), rtol=1e-6, atol=1e-7)


def grown(models: Path, out: Path, manifest: dict) -> None:
    a = load_file(models / "a" / "model.safetensors")
    result = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    for name, value in result.items():
        layer = layer_index(name)
        source = name if layer is None else name.replace(f"layers.{layer}.", f"layers.{min(layer, 3)}.")
        assert torch.equal(value, a[source]), name


def shrunk(models: Path, out: Path, manifest: dict) -> None:
    a = load_file(models / "a" / "model.safetensors")
    result = load_file(out / "model.safetensors")
    edited = "model.layers.1.mlp.down_proj.weight"
    assert manifest["nodes"]["m"]["edited"] == [edited]
    torch.testing.assert_close(result[edited], a[edited] * 0.75)
    assert all(torch.equal(v, a[k]) for k, v in result.items() if k != edited)


def routed(models: Path, out: Path, manifest: dict) -> None:
    """k = 1 with the `first` router runs each layer's first expert only: the dense model
    with every other expert's down columns zeroed computes the same logits."""
    from transformers import AutoModelForCausalLM

    assert manifest["routing"]["router"] == "first"
    routing = load_file(out / "routing.safetensors")
    assert torch.equal(routing["layers.0.router.preference"], torch.tensor([4.0, 3.0, 2.0, 1.0]))
    dense = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for layer in dense.model.layers:
            layer.mlp.down_proj.weight[:, 16:] = 0     # 64 neurons, 4 experts: expert 0 is the first 16
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    torch.testing.assert_close(cfmlang.load(out)(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


CHECKS = {"scaled_mean": merged, "repeat_last": grown, "shrink": shrunk, "first": routed}


def test_loading_a_route_whose_router_is_not_registered_is_e091(extension, models, tmp_path, monkeypatch):
    path = write(models, "first", GOOD["first"])
    out = cfmlang.compile(path, tmp_path / "out").output_dir
    monkeypatch.delitem(ROUTER_LOADERS, "first")
    with pytest.raises(CompileError) as info:
        cfmlang.load(out)
    (diagnostic,) = info.value.diagnostics
    assert diagnostic.code == "E091" and "`first`" in diagnostic.message and "register_router" in diagnostic.help[0]
