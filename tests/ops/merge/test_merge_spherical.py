"""slerp, nuslerp, multislerp and karcher: against mergekit 0.1.5 (bit for bit), against
independent float64 formulas, and their diagnostics."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cfmlang
from models import layer_index
from cfmlang.diagnostics import CompileError
from mergekit_oracle import run_mergekit, tensors
from test_merge import gradient


# ---- helpers -------------------------------------------------------------------------------

def program(models: dict[str, Path], merge: str, output_dtype: bool = True) -> str:
    """A .brick text declaring `models` and the merge `m` (body given), output m."""
    declared = "".join(f'model {name}:\n  source: hf "{path}"\n' for name, path in models.items())
    body = "".join(f"  {line}\n" for line in merge.strip().splitlines())
    dtype = "  dtype: float32\n" if output_dtype else ""
    return f"{declared}merge m:\n{body}{dtype}output: m\n"


def mergekit(method: str, models: list, base: Path | None = None, parameters: dict | None = None,
             dtype: str | None = "float32") -> dict:
    """A mergekit config: `models` is a list of paths or (path, per-model parameters)."""
    entries = [{"model": str(m[0]), "parameters": m[1]} if isinstance(m, tuple) else {"model": str(m)}
               for m in models]
    config = {"merge_method": method, "models": entries, "parameters": parameters or {}}
    if base is not None:
        config["base_model"] = str(base)
    if dtype:
        config["dtype"] = dtype
    return config


def compile_and_oracle(text: str, config: dict, tmp_path: Path):
    cfmlang.compile(text, tmp_path / "ours")
    return tensors(tmp_path / "ours"), run_mergekit(config, tmp_path / "mk")


def assert_identical(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name


def derived_model(source: Path, folder: Path, transform) -> Path:
    """A copy of the model at `source` with every tensor replaced by transform(tensor)."""
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    save_file({n: transform(t).contiguous() for n, t in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    return folder


def compile_error(text: str, tmp_path: Path) -> CompileError:
    with pytest.raises(CompileError) as caught:
        cfmlang.compile(text, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    return caught.value


def check_error(text: str) -> CompileError:
    with pytest.raises(CompileError) as caught:
        cfmlang.check(text)
    return caught.value


@pytest.fixture(scope="module")
def shapes(tiny_zoo, tmp_path_factory) -> dict[str, Path]:
    """Llama models with special geometry: a scaled copy of llama_a (parallel to it), its
    negation (antipodal) and an all-zero model."""
    root = tmp_path_factory.mktemp("shapes")
    a = tiny_zoo["llama_a"]
    return {"scaled": derived_model(a, root / "scaled", lambda t: t * 2.5),
            "negated": derived_model(a, root / "negated", lambda t: -t),
            "zero": derived_model(a, root / "zero", torch.zeros_like)}


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def reference_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor,
                    linear_above: float = 1.0) -> torch.Tensor:
    """Textbook slerp of two whole tensors in float64; a lerp when |cos| > linear_above."""
    v0, v1 = v0.double(), v1.double()
    cos = (unit(v0) * unit(v1)).sum().clamp(-1, 1)
    if cos.abs() > linear_above:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(cos)
    return (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)


# ---- slerp -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,t", [("llama", [0.1, 0.6, 0.9]), ("mistral", 0.35)])
def test_slerp_matches_formula_and_mergekit(tiny_zoo, tmp_path, arch, t):
    a, b = tiny_zoo[f"{arch}_a"], tiny_zoo[f"{arch}_b"]
    text = program({"a": a, "b": b}, f"method: slerp\nbase: a\nt: {t}\ninputs: [b]")
    ours, theirs = compile_and_oracle(text, mergekit("slerp", [a, b], base=a, parameters={"t": t}),
                                      tmp_path)
    assert_identical(ours, theirs)
    ta, tb = tensors(a), tensors(b)
    for name, value in ours.items():
        # the norm weights of the tiny models are all near 1: nearly parallel, so linear
        expected = reference_slerp(gradient(t, layer_index(name)), ta[name], tb[name], 0.9995)
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_slerp_reduces_tensors_over_a_million_elements_in_chunks_like_mergekit(tmp_path):
    from models import tiny_model

    # embeddings and LM head of 33000 x 32 = 1 056 000 elements: two chunks of 2**20
    a = tiny_model(tmp_path / "a", 1, vocab_size=33000)
    b = tiny_model(tmp_path / "b", 2, vocab_size=33000)
    text = program({"a": a, "b": b}, "method: slerp\nbase: a\nt: 0.7\ninputs: [b]")
    ours, theirs = compile_and_oracle(text, mergekit("slerp", [a, b], base=a, parameters={"t": 0.7}),
                                      tmp_path)
    assert ours["lm_head.weight"].numel() > 2**20
    assert_identical(ours, theirs)


def test_slerp_with_tensor_name_filters_matches_mergekit(tiny_zoo, tmp_path):
    a, b = tiny_zoo["llama_a"], tiny_zoo["llama_b"]
    text = program({"a": a, "b": b}, "method: slerp\nbase: a\ninputs: [b]\n"
                                     "t: {self_attn: [0, 0.5, 1], mlp: [1, 0.5, 0], default: 0.5}")
    t = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]},
         {"value": 0.5}]
    ours, theirs = compile_and_oracle(text, mergekit("slerp", [a, b], base=a, parameters={"t": t}),
                                      tmp_path)
    assert_identical(ours, theirs)
    tb = tensors(b)
    assert torch.equal(ours["model.layers.0.mlp.up_proj.weight"], tb["model.layers.0.mlp.up_proj.weight"])


def test_slerp_base_is_t_zero_whatever_the_listing_order(tiny_zoo, tmp_path):
    a, b = tiny_zoo["mistral_a"], tiny_zoo["mistral_b"]
    # b is the base although it is listed second; t runs from 0 (layer 0) to 1 (layer 3)
    text = program({"a": a, "b": b}, "method: slerp\nbase: b\nt: [0, 1]\ninputs: [a, b]")
    ours, theirs = compile_and_oracle(
        text, mergekit("slerp", [a, b], base=b, parameters={"t": [0, 1]}), tmp_path)
    assert_identical(ours, theirs)
    ta, tb = tensors(a), tensors(b)
    assert torch.equal(ours["model.embed_tokens.weight"], tb["model.embed_tokens.weight"])  # t = 0
    assert torch.equal(ours["model.layers.0.mlp.up_proj.weight"], tb["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(ours["model.layers.3.mlp.up_proj.weight"], ta["model.layers.3.mlp.up_proj.weight"])


def test_slerp_interpolates_linearly_when_parallel(tiny_zoo, shapes, tmp_path):
    a, scaled = tiny_zoo["llama_a"], shapes["scaled"]
    text = program({"a": a, "s": scaled}, "method: slerp\nbase: a\nt: 0.3\ninputs: [s]")
    ours, theirs = compile_and_oracle(text, mergekit("slerp", [a, scaled], base=a,
                                                     parameters={"t": 0.3}), tmp_path)
    assert_identical(ours, theirs)
    for name, value in tensors(a).items():
        torch.testing.assert_close(ours[name], value * (0.7 + 0.3 * 2.5), rtol=1e-6, atol=1e-7)


def test_slerp_on_bfloat16_inputs_keeps_their_dtype(tmp_path):
    from models import tiny_model

    a = tiny_model(tmp_path / "a", 1, dtype=torch.bfloat16)
    b = tiny_model(tmp_path / "b", 2, dtype=torch.bfloat16)
    text = program({"a": a, "b": b}, "method: slerp\nbase: a\nt: 0.4\ninputs: [b]", output_dtype=False)
    ours, theirs = compile_and_oracle(
        text, mergekit("slerp", [a, b], base=a, parameters={"t": 0.4}, dtype=None), tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert_identical(ours, theirs)


def test_slerp_blocks_of_rows_give_the_same_bytes(tiny_zoo, tmp_path):
    a, b = tiny_zoo["llama_a"], tiny_zoo["llama_b"]
    text = program({"a": a, "b": b}, "method: slerp\nbase: a\nt: [0.2, 0.8]\ninputs: [b]")
    cfmlang.compile(text, tmp_path / "whole")
    cfmlang.compile(text, tmp_path / "blocks", chunk_bytes=300)
    assert ((tmp_path / "blocks" / "model.safetensors").read_bytes()
            == (tmp_path / "whole" / "model.safetensors").read_bytes())


def test_slerp_needs_exactly_one_input_besides_the_base(tiny_zoo):
    models = {n: tiny_zoo[f"llama_{n}"] for n in "abc"}
    exc = check_error(program(models, "method: slerp\nbase: a\nt: 0.5\ninputs: [a, b, c]"))
    assert [d.code for d in exc.diagnostics] == ["E034"]
    assert "`slerp` takes exactly 1 input besides the base, got 2" in exc.diagnostics[0].message


def test_slerp_needs_a_base_and_t(tiny_zoo):
    models = {n: tiny_zoo[f"llama_{n}"] for n in "ab"}
    exc = check_error(program(models, "method: slerp\ninputs: [b]"))
    messages = sorted(d.message for d in exc.diagnostics)
    assert [d.code for d in exc.diagnostics] == ["E014", "E014"]
    assert messages == ["merge method `slerp` needs a `base:` model", "missing parameter `t`"]


# ---- nuslerp ---------------------------------------------------------------------------------

NUSLERP_CASES = [
    ("llama", True, {}),                                                    # task vectors, whole tensors
    ("mistral", False, {"nuslerp_flatten": False}),                         # each row a vector
    ("llama", False, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),  # each column
    ("mistral", True, {"nuslerp_row_wise": True}),                          # flatten wins
]


@pytest.mark.parametrize("arch,with_base,options", NUSLERP_CASES)
def test_nuslerp_matches_mergekit(tiny_zoo, tmp_path, arch, with_base, options):
    a, b, c = (tiny_zoo[f"{arch}_{n}"] for n in "abc")
    lines = ["method: nuslerp", *(f"{k}: {str(v).lower()}" for k, v in options.items()),
             "inputs:", "  b: {weight: 0.3}", "  c: {weight: [0.2, 0.9]}"]
    if with_base:
        lines.insert(1, "base: a")
    ours, theirs = compile_and_oracle(
        program({"a": a, "b": b, "c": c}, "\n".join(lines)),
        mergekit("nuslerp", [(b, {"weight": 0.3}), (c, {"weight": [0.2, 0.9]})],
                 base=a if with_base else None, parameters=options), tmp_path)
    assert_identical(ours, theirs)


def test_nuslerp_of_whole_tensors_matches_the_formula(tiny_zoo, tmp_path):
    a, b, c = (tiny_zoo[f"llama_{n}"] for n in "abc")
    cfmlang.compile(program({"a": a, "b": b, "c": c},
                            "method: nuslerp\nbase: a\ninputs: {b: {weight: 1}, c: {weight: 3}}"),
                    tmp_path / "out")
    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    for name, value in tensors(tmp_path / "out").items():
        base = ta[name].double()
        expected = base + reference_slerp(0.75, tb[name] - ta[name], tc[name] - ta[name])
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_nuslerp_weights_summing_to_zero_give_the_midpoint(tiny_zoo, tmp_path):
    a, b = tiny_zoo["mistral_a"], tiny_zoo["mistral_b"]
    text = program({"a": a, "b": b}, "method: nuslerp\ninputs: {a: {weight: 0.5}, b: {weight: -0.5}}")
    ours, theirs = compile_and_oracle(
        text, mergekit("nuslerp", [(a, {"weight": 0.5}), (b, {"weight": -0.5})]), tmp_path)
    assert_identical(ours, theirs)
    cfmlang.compile(text.replace("-0.5", "0.5"), tmp_path / "equal")
    assert_identical(ours, tensors(tmp_path / "equal"))


@pytest.mark.parametrize("inputs,got", [("{b: {weight: 1}}", 1),
                                        ("{b: {weight: 1}, c: {weight: 1}, d: {weight: 1}}", 3)])
def test_nuslerp_needs_exactly_two_inputs(tiny_zoo, inputs, got):
    models = {n: tiny_zoo[f"llama_{n}"] for n in "abc"} | {"d": tiny_zoo["llama_a"]}
    exc = check_error(program(models, f"method: nuslerp\nbase: a\ninputs: {inputs}"))
    assert [d.code for d in exc.diagnostics] == ["E034"]
    assert f"`nuslerp` takes exactly 2 inputs besides the base, got {got}" in exc.diagnostics[0].message


# ---- multislerp ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,with_base,options", [
    ("llama", True, {}),
    ("mistral", False, {"normalize_weights": False, "eps": [1e-8, 1e-3]}),
])
def test_multislerp_matches_mergekit(tiny_zoo, tmp_path, arch, with_base, options):
    a, b, c = (tiny_zoo[f"{arch}_{n}"] for n in "abc")
    weights = {"a": 0.5, "b": [0.2, 0.7], "c": 0.3}
    option_lines = [f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]
    models = {"b": b, "c": c} if with_base else {"a": a, "b": b, "c": c}
    text = program({"a": a, "b": b, "c": c}, "\n".join(
        ["method: multislerp", *(["base: a"] * with_base), *option_lines, "inputs:",
         *(f"  {n}: {{weight: {weights[n]}}}" for n in models)]))
    ours, theirs = compile_and_oracle(text, mergekit(
        "multislerp", [(path, {"weight": weights[n]}) for n, path in models.items()],
        base=a if with_base else None, parameters=options), tmp_path)
    assert_identical(ours, theirs)
    if not with_base and not options["normalize_weights"]:
        return
    # the result's norm is the weighted mean of the (task vectors') norms
    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    for name in ["model.layers.2.mlp.down_proj.weight", "lm_head.weight"]:
        wb = gradient([0.2, 0.7], layer_index(name))
        deltas = [(tb[name] - ta[name]).double(), (tc[name] - ta[name]).double()]
        expected = (wb * deltas[0].norm() + 0.3 * deltas[1].norm()) / (wb + 0.3)
        torch.testing.assert_close((ours[name] - ta[name]).double().norm(), expected, rtol=1e-5, atol=0)


def test_multislerp_of_one_input_is_that_input(tiny_zoo, tmp_path):
    a, b = tiny_zoo["llama_a"], tiny_zoo["llama_b"]
    text = program({"a": a, "b": b}, "method: multislerp\nbase: a\ninputs: {b: {weight: 0.4}}")
    ours, theirs = compile_and_oracle(
        text, mergekit("multislerp", [(b, {"weight": 0.4})], base=a), tmp_path)
    assert_identical(ours, theirs)
    assert_identical(ours, tensors(b))


def test_multislerp_antipodal_pair_falls_back_to_linear(tiny_zoo, shapes, tmp_path):
    a, negated = tiny_zoo["llama_a"], shapes["negated"]
    text = program({"a": a, "n": negated}, "method: multislerp\nweight: 0.5\ninputs: [a, n]")
    ours, theirs = compile_and_oracle(
        text, mergekit("multislerp", [(a, {"weight": 0.5}), (negated, {"weight": 0.5})]), tmp_path)
    assert_identical(ours, theirs)
    assert all(not value.any() for value in ours.values())   # 0.5 a + 0.5 (-a)


def test_multislerp_cancelling_directions_of_three_inputs_is_an_error(tiny_zoo, shapes, tmp_path):
    models = {"a": tiny_zoo["llama_a"], "n": shapes["negated"], "b": tiny_zoo["llama_b"]}
    text = program(models, "method: multislerp\ninputs: {a: {weight: 0.5}, n: {weight: 0.5}, "
                           "b: {weight: 0}}")
    exc = compile_error(text, tmp_path)
    assert [d.code for d in exc.diagnostics] == ["E080"]
    assert "cancel out" in exc.diagnostics[0].message and "merge `m`" in exc.diagnostics[0].message
    assert exc.diagnostics[0].span is not None and "balance exactly" in exc.diagnostics[0].help[0]


def test_multislerp_needs_an_input_besides_the_base(tiny_zoo):
    a = tiny_zoo["llama_a"]
    exc = check_error(program({"a": a}, "method: multislerp\nbase: a\ninputs: {a: {weight: 1}}"))
    assert [d.code for d in exc.diagnostics] == ["E034"]
    assert "takes at least 1 input besides the base, got 0" in exc.diagnostics[0].message


# ---- karcher ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,options", [
    ("llama", {}),
    ("mistral", {"max_iter": 3, "tol": [1e-5, 1e-2]}),
])
def test_karcher_matches_mergekit(tiny_zoo, tmp_path, arch, options):
    a, b, c = (tiny_zoo[f"{arch}_{n}"] for n in "abc")
    text = program({"a": a, "b": b, "c": c},
                   "\n".join(["method: karcher", *(f"{k}: {v}" for k, v in options.items()),
                              "inputs: [b, c, a]"]))
    # mergekit's karcher merges its base_model as one more input, appended after `models:`
    ours, theirs = compile_and_oracle(text, mergekit("karcher", [b, c], base=a, parameters=options),
                                      tmp_path)
    assert_identical(ours, theirs)


def test_karcher_takes_no_base(tiny_zoo):
    models = {n: tiny_zoo[f"llama_{n}"] for n in "ab"}
    exc = check_error(program(models, "method: karcher\nbase: a\ninputs: [b]"))
    assert [d.code for d in exc.diagnostics] == ["E013"]
    assert "takes no `base:`" in exc.diagnostics[0].message


def test_karcher_of_two_is_the_geodesic_midpoint(tiny_zoo, tmp_path):
    a, b = tiny_zoo["llama_a"], tiny_zoo["llama_b"]
    cfmlang.compile(program({"a": a, "b": b}, "method: karcher\ninputs: [a, b]"), tmp_path / "out")
    ta, tb = tensors(a), tensors(b)
    for name, value in tensors(tmp_path / "out").items():
        va, vb = ta[name].double(), tb[name].double()
        expected = (va.norm() + vb.norm()) / 2 * unit(unit(va) + unit(vb))
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_karcher_skips_zero_directions_but_counts_their_norm(tiny_zoo, shapes, tmp_path):
    a, b, zero = tiny_zoo["llama_a"], tiny_zoo["llama_b"], shapes["zero"]
    ours, theirs = compile_and_oracle(
        program({"a": a, "b": b, "z": zero}, "method: karcher\ninputs: [a, z, b]"),
        mergekit("karcher", [a, zero, b]), tmp_path)
    assert_identical(ours, theirs)
    cfmlang.compile(program({"a": a, "z": zero}, "method: karcher\ninputs: [z, z2]").replace(
        "model a:", f'model z2:\n  source: hf "{zero}"\nmodel a:'), tmp_path / "zeros")
    assert all(not value.any() for value in tensors(tmp_path / "zeros").values())


def test_karcher_max_iter_must_not_be_negative(tiny_zoo):
    models = {n: tiny_zoo[f"llama_{n}"] for n in "ab"}
    exc = check_error(program(models, "method: karcher\nmax_iter: -1\ninputs: [a, b]"))
    assert [d.code for d in exc.diagnostics] == ["E032"]
    assert "max_iter" in exc.diagnostics[0].message
    assert "greater than or equal to 0" in exc.diagnostics[0].message


def test_karcher_and_slerp_inputs_take_no_parameters(tiny_zoo):
    models = {n: tiny_zoo[f"llama_{n}"] for n in "ab"}
    for method in ("karcher", "slerp\nbase: a\nt: 0.5"):
        exc = check_error(program(models, f"method: {method}\ninputs: {{b: {{weight: 1}}}}"))
        assert [d.code for d in exc.diagnostics] == ["E013"]
        assert "unknown parameter `weight`" in exc.diagnostics[0].message
