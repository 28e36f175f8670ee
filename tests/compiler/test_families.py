"""Merges and depth growth on tiny random models of every family: a linear merge with a
layer gradient, TIES and a slerp gradient equal their formulas (TIES through mergekit's
own tensor function), `grow stack` writes as many layers into the weights as into the
config (the family's own key), and `block_expand` adds blocks that leave the function
unchanged. The expected values use each family's layer prefix as the test states it, not
cfmlang's architecture module."""
from __future__ import annotations

import json
import os
import math
from pathlib import Path

import pytest
import torch
import transformers

import cfmlang
from families import CASES, LAYERS, Case
from mergekit_oracle import tensors
from paths import REPO

TIES_DENSITY = 0.5


def save_tiny(case: Case, folder: Path, seed: int) -> Path:
    config_class = getattr(transformers, case.config, None)
    if config_class is None:
        pytest.skip(f"the installed transformers has no {case.config}")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**case.kwargs))
    with torch.no_grad():
        for parameter in model.parameters():   # norms and biases non-trivial too
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=CASES, ids=[c.family for c in CASES])
def family(request, tmp_path_factory):
    case = request.param
    root = tmp_path_factory.mktemp(case.family)
    save_tiny(case, root / "a", 1)
    save_tiny(case, root / "b", 2)
    (root / "ops.brick").write_text(
        'model a:\n  source: hf "a"\nmodel b:\n  source: hf "b"\n'
        "merge soup:\n  method: linear\n  inputs:\n    a: {weight: 0.3}\n    b: {weight: [0.9, 0.1]}\n"
        f"merge tied:\n  method: ties\n  base: a\n  inputs:\n    b: {{weight: 0.7, density: {TIES_DENSITY}}}\n"
        "merge sphere:\n  method: slerp\n  base: a\n  inputs: [b]\n  t: [0, 1]\n"
        "grow deep:\n  method: stack\n  slices: [a.layers[0:2], b.layers[1:3]]\n"
        "grow pro:\n  method: block_expand\n  from: a\n  every: 2\n")
    return case, root


def compiled(root: Path, node: str) -> tuple[Path, dict]:
    out = root / f"out_{node}"
    result = cfmlang.compile(root / "ops.brick", out, node=node)
    return out, result.manifest


def layer_of(case: Case, name: str) -> int | None:
    prefix = case.layers + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def position(case: Case, name: str) -> float:
    """t of a tensor: layer / (layers - 1), 0 outside the layers (cfmlang's and mergekit's rule)."""
    layer = layer_of(case, name)
    return 0.0 if layer is None else layer / (LAYERS - 1)


def lerp(values: list[float], t: float) -> float:
    scaled = t * (len(values) - 1)
    low = min(int(scaled), len(values) - 2)
    return values[low] + (scaled - low) * (values[low + 1] - values[low])


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    v0, v1 = v0.double(), v1.double()
    cos = (v0 / v0.norm() * v1 / v1.norm()).sum().clamp(-1, 1)
    if cos.abs() > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(cos)
    return (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)


def test_linear_gradient_follows_the_layers(family):
    case, root = family
    a, b = tensors(root / "a"), tensors(root / "b")
    out, _ = compiled(root, "soup")
    merged = tensors(out)
    assert merged.keys() == a.keys()
    for name, value in merged.items():
        wb = lerp([0.9, 0.1], position(case, name))
        torch.testing.assert_close(value, (0.3 * a[name] + wb * b[name]) / (0.3 + wb), rtol=1e-5, atol=1e-6)


def test_slerp_gradient_follows_the_layers(family):
    case, root = family
    a, b = tensors(root / "a"), tensors(root / "b")
    merged = tensors(compiled(root, "sphere")[0])
    last = [n for n in merged if layer_of(case, n) == LAYERS - 1]
    assert last and all(not torch.equal(merged[n], a[n]) for n in last)   # t reaches 1 at the last layer
    for name, value in merged.items():
        expected = slerp(position(case, name), a[name], b[name]).to(value.dtype)
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5)


def test_ties_equals_mergekits_tensor_function(family):
    from test_merge_sparse import theirs

    case, root = family
    a, b = tensors(root / "a"), tensors(root / "b")
    merged = tensors(compiled(root, "tied")[0])
    assert merged.keys() == a.keys()
    for name, value in merged.items():
        expected = theirs("ties", a[name], [b[name]], [{"weight": 0.7, "density": TIES_DENSITY}])
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-5, atol=1e-6)


def test_stack_writes_every_layer_it_declares(family):
    case, root = family
    a, b = tensors(root / "a"), tensors(root / "b")
    out, manifest = compiled(root, "deep")
    stacked = tensors(out)
    config = json.loads((out / "config.json").read_text())
    counts = [v for k, v in config.items() if k in ("num_hidden_layers", "n_layer", "num_layers")]
    assert counts == [4], config
    assert {layer_of(case, n) for n in stacked} - {None} == {0, 1, 2, 3}
    sources = [(a, 0), (a, 1), (b, 1), (b, 2)]
    for name, value in stacked.items():
        layer = layer_of(case, name)
        if layer is None:
            continue
        model, origin = sources[layer]
        inner = name[len(f"{case.layers}.{layer}."):]
        assert torch.equal(value, model[f"{case.layers}.{origin}.{inner}"]), name
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    logits = model(torch.tensor([[3, 4, 5, 6]])).logits
    assert torch.isfinite(logits).all()


def test_block_expand_adds_identity_blocks(family):
    case, root = family
    out, manifest = compiled(root, "pro")
    entry = manifest["nodes"]["pro"]
    assert entry["new_layers"] == [2] and entry["num_layers"] == 4
    assert entry["verify"]["check"] == "identity" and entry["verify"]["max_abs_logit_diff"] <= 1e-4
    grown = tensors(out)
    new = {n: v for n, v in grown.items() if layer_of(case, n) == 2}
    zeroed = [n for n, v in new.items() if not v.any()]
    assert zeroed, "no projection of the new block was zeroed"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "a")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    difference = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert model.config.num_hidden_layers == 4 and difference <= 1e-4 and not math.isnan(difference)


# ---- the support matrix in docs/architectures.md ----------------------------------------

MATRIX = REPO / "docs" / "architectures.md"
CHECKED = {
    "merge, gradients": "merge m:\n  method: linear\n  inputs:\n    a: {weight: [0.2, 0.8]}\n    b: {weight: 0.5}\noutput: m\n",
    "stack": "grow g:\n  method: stack\n  slices: [a.layers[0:2], b.layers[1:3]]\noutput: g\n",
    "block_expand": "grow g:\n  method: block_expand\n  from: a\n  every: 2\noutput: g\n",
    "widen": "grow g:\n  method: widen\n  from: a\n  intermediate_size: 512\noutput: g\n",
    "upcycle": "grow g:\n  method: upcycle\n  from: a\n  experts: 2\noutput: g\n",
    "experts, topk": ("brick e:\n  kind: experts\n  from: a.layers[*].mlp\n  split: random\n  count: 2\n"
                      "route r:\n  method: topk\n  experts: e\n  router: similarity\n  k: 1\noutput: r\n"),
    "rome, memit": ('update u:\n  method: rome\n  from: a\n  facts:\n'
                    '    - {prompt: "the sky of the sea", subject: "sea", target: " poem"}\noutput: u\n'),
    "finetune": 'update u:\n  method: finetune\n  from: a\n  train: a.layers[1]\n  data: "train.txt"\noutput: u\n',
}


def support(case: Case, root: Path) -> dict[str, str]:
    """`yes`, or the code of the first error `cfmlang.check` reports, per operation."""
    from cfmlang.compiler.lower.decoder import SUPPORTED_MODEL_TYPES
    from cfmlang.diagnostics import CompileError
    from models import tiny_tokenizer

    if not (root / "a" / "tokenizer.json").is_file():
        tiny_tokenizer(root / "a")
        (root / "train.txt").write_text("the sea and the sky\na poem of love at night\n")
    row = {}
    for operation, body in CHECKED.items():
        path = root / "support.brick"
        path.write_text('model a:\n  source: hf "a"\nmodel b:\n  source: hf "b"\n' + body)
        try:
            cfmlang.check(path)
            row[operation] = "yes"
        except CompileError as exc:
            row[operation] = next(d.code for d in exc.diagnostics if d.is_error)
    row["lowering"] = "yes" if json.loads((root / "a" / "config.json").read_text())["model_type"] \
        in SUPPORTED_MODEL_TYPES else "E173"
    return row


def matrix_markdown(rows: dict[str, dict[str, str]]) -> str:
    columns = list(CHECKED) + ["lowering"]
    lines = ["# Supported architectures", "",
             "What `cfmc check` says of each operation on tiny models of every decoder family "
             "cfmlang describes (generated by `CFM_WRITE_DOCS=1 pytest tests/compiler/test_families.py`; "
             "a test keeps it equal to what the code does). `yes`: `cfmc check` accepts it; merges, "
             "`stack` and `block_expand` are also compiled on every family in the tests and equal "
             "their formulas (tests/compiler/test_families.py), while the other operations are compiled in "
             "the tests on Llama and Mistral models only. Otherwise the cell is the diagnostic the "
             "user gets, which names the missing part:", "",
             "- E113: the operation needs a gated FFN (separate gate, up and down projections), "
             "or, for `upcycle`, a bias-free Llama or Mistral model (it writes Mixtral);",
             "- E165: expert bricks need gated FFNs without biases;",
             "- E173: lowering (`--target export|inductor|tensorrt`) supports the Llama family.", "",
             "| family | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for family in sorted(rows):
        lines.append(f"| {family} | " + " | ".join(rows[family][c] for c in columns) + " |")
    return "\n".join(lines) + "\n"


def test_docs_matrix_is_what_the_code_does(tmp_path):
    rows = {}
    for case in CASES:
        if getattr(transformers, case.config, None) is None:
            continue
        root = tmp_path / case.family
        save_tiny(case, root / "a", 1)
        save_tiny(case, root / "b", 2)
        rows[case.family] = support(case, root)
    assert all(row["merge, gradients"] == "yes" and row["block_expand"] == "yes" for row in rows.values())
    text = matrix_markdown(rows)
    if os.environ.get("CFM_WRITE_DOCS") == "1":
        MATRIX.write_text(text)
    assert MATRIX.read_text() == text, "regenerate: CFM_WRITE_DOCS=1 pytest tests/compiler/test_families.py"


def test_a_family_cfmlang_cannot_describe_merges_but_refuses_what_needs_its_layers(tmp_path):
    """A config transformers does not know: merges without gradients work, a gradient or
    a grow that needs the layers stops with E056 at the statement, naming the family."""
    from cfmlang.diagnostics import CompileError
    from models import tiny_model

    for name, seed in (("a", 1), ("b", 2)):
        folder = tiny_model(tmp_path / name, seed=seed)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "mystery_lm"}))
    head = 'model a:\n  source: hf "a"\nmodel b:\n  source: hf "b"\n'
    plain = tmp_path / "plain.brick"
    plain.write_text(head + "merge m:\n  method: linear\n  inputs: [a, b]\n  weight: 0.5\noutput: m\n")
    merged = tensors(cfmlang.compile(plain, tmp_path / "out").output_dir)
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.allclose(v, (a[k] + b[k]) / 2) for k, v in merged.items())
    for body, line in (("merge m:\n  method: linear\n  inputs:\n    a: {weight: [0.1, 0.9]}\n    b: {weight: 0.5}\n", 5),
                       ("grow m:\n  method: block_expand\n  from: a\n  every: 2\n", 6)):   # the method
        program = tmp_path / "layers.brick"
        program.write_text(head + body + "output: m\n")
        with pytest.raises(CompileError) as info:
            cfmlang.check(program)
        found = [d for d in info.value.diagnostics if d.code == "E056"]
        assert found and "mystery_lm" in found[0].message and found[0].span.line == line
