"""The generalized task arithmetic family (ties, dare_*, breadcrumbs*, della*) against
mergekit 0.1.5: bit for bit where the math is deterministic, in distribution where it
draws random masks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.merge_methods.registry import get as mergekit_method
from mergekit.sparsify import bernoulli, della_magprune, magnitude, magnitude_outliers

import cfmlang
from models import layer_index
from cfmlang.diagnostics import CompileError
from cfmlang.ops import lookup
from cfmlang.ops.merge.base import MergeContext
from cfmlang.ops.merge.sparse import (keep_at_random, keep_by_magnitude_rank, keep_largest,
                                         keep_magnitude_band, rank_fractions, sign_agreement)
from mergekit_oracle import run_mergekit, tensors

DETERMINISTIC = ["ties", "breadcrumbs", "breadcrumbs_ties"]
RANDOM = ["dare_ties", "dare_linear", "della", "della_linear"]
NUM_LAYERS = 4


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def task_vectors(count: int, shape=(24, 40), seed: int = 0, dtype=torch.float32):
    """A base and `count` models near it."""
    g = generator(seed)
    base = torch.randn(shape, generator=g)
    models = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(count)]
    return base.to(dtype), [m.to(dtype) for m in models]


def ours(method: str, base, models, inputs: list[dict], seed: int = 0, **options) -> torch.Tensor:
    """Our merge of one tensor, with parameters validated as the checker does."""
    cls = lookup("merge", method)
    weights = [cls.Input.model_validate(i).model_dump(by_alias=True) for i in inputs]
    settings = cls.Options.model_validate(options).model_dump(by_alias=True)
    return cls.merge(models, base, weights, settings, MergeContext("m", "t", seed))


def theirs(method: str, base, models, inputs: list[dict], **options) -> torch.Tensor:
    """mergekit's merge of one tensor (per-input parameters as lists over the inputs)."""
    per_input = {key: [i[key] for i in inputs] for key in inputs[0]}
    group = TensorGroup.from_tensors([base, *models], base_index=0)
    return mergekit_method(method)([group], parameters={**per_input, **options})[0]


# ---- the pieces, against mergekit's functions ----------------------------------------
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shape", [(24, 40), (96,)])
def test_magnitude_pruning_matches_mergekit(density, rescale, shape):
    delta = torch.randn(shape, generator=generator(1))
    delta[:3] = 0.25          # ties in magnitude
    delta.view(-1)[-4:] = -0.25
    norm = "l1" if rescale else None
    params = {"density": density}
    assert torch.equal(keep_largest(delta, params, rescale, None), magnitude(delta, density, norm))


@pytest.mark.parametrize("density,gamma", [(0.0, 0.01), (0.3, 0.01), (0.5, 0.1), (0.9, 0.2),
                                           (0.95, 0.0), (1.0, 0.5), (0.6, 0.0001)])
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_band_matches_mergekit(density, gamma, rescale):
    delta = torch.randn(30, 50, generator=generator(2))
    expected = magnitude_outliers(delta, density, "l1" if rescale else None, gamma=gamma)
    got = keep_magnitude_band(delta, {"density": density, "gamma": gamma}, rescale, None)
    assert torch.equal(got, expected)


def test_breadcrumbs_band_keeps_the_middle_magnitudes():
    delta = torch.arange(1.0, 101.0)       # magnitudes 1..100
    kept = keep_magnitude_band(delta, {"density": 0.3, "gamma": 0.1}, False, None)
    assert torch.equal(kept.nonzero().flatten(), torch.arange(60, 90))   # 61..90 kept


def test_bf16_pruning_matches_mergekit_without_rescale():
    delta = torch.randn(24, 40, generator=generator(3)).to(torch.bfloat16)
    assert torch.equal(keep_largest(delta, {"density": 0.4}, False, None), magnitude(delta, 0.4))
    band = keep_magnitude_band(delta, {"density": 0.4, "gamma": 0.05}, False, None)
    assert torch.equal(band, magnitude_outliers(delta, 0.4, gamma=0.05))
    # with rescale, our L1 norms are taken in float32 (mergekit's in bf16): within one bf16 ulp
    rescaled = keep_largest(delta, {"density": 0.4}, True, None)
    torch.testing.assert_close(rescaled, magnitude(delta, 0.4, "l1"), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("method", ["sum", "count"])
@pytest.mark.parametrize("int8", [False, True])
def test_sign_agreement_matches_mergekit(method, int8):
    deltas = torch.randn(3, 20, 30, generator=generator(4))
    deltas[:, 0, :5] = 0                         # all-zero positions elect +
    deltas[0, 1, :5], deltas[1, 1, :5], deltas[2, 1, :5] = 1.0, -1.0, 0.0   # a tied vote
    expected = get_mask(deltas, method=method, mask_dtype=torch.int8 if int8 else None)
    assert torch.equal(sign_agreement(deltas, method, int8), expected)
    with pytest.raises(ValueError, match="unknown sign consensus"):
        sign_agreement(deltas, "median")


def test_sign_agreement_elects_by_mass_or_by_count():
    deltas = torch.tensor([[5.0], [-1.0], [-1.0]])
    assert sign_agreement(deltas, "sum").flatten().tolist() == [True, False, False]
    assert sign_agreement(deltas, "count").flatten().tolist() == [False, True, True]


@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_whole_merge_matches_mergekit_on_one_tensor(method, dtype):
    base, models = task_vectors(3, dtype=dtype)
    inputs = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.7},
              {"weight": -0.4, "density": 1.0}]
    if method.startswith("breadcrumbs"):
        for entry, gamma in zip(inputs, (0.05, 0.0, 0.2)):
            entry["gamma"] = gamma
    for options in ({}, {"normalize": True, "lambda": 0.7, "int8_mask": True},
                    {"normalize": False, "lambda": 1.5}):
        expected = theirs(method, base, models, inputs, **options)
        assert torch.equal(ours(method, base, models, inputs, **options), expected), options


def test_ties_on_hand_computed_values():
    base = torch.zeros(4)
    b = torch.tensor([3.0, -1.0, 0.5, 2.0])
    c = torch.tensor([-1.0, -2.0, 4.0, 0.1])
    # density 0.5 keeps b: [3, 0, 0, 2], c: [0, -2, 4, 0]; signs elected +, -, +, +
    merged = ours("ties", base, [b, c], [{"weight": 1.0, "density": 0.5},
                                         {"weight": 1.0, "density": 0.5}])
    assert merged.tolist() == [3.0, -2.0, 4.0, 2.0]
    merged = ours("ties", base, [b, c], [{"weight": 2.0, "density": 1.0},
                                         {"weight": 1.0, "density": 1.0}], normalize=False)
    # sums 5, -4, 5, 4.1 elect +, -, +, +; b's -1 agrees at index 1, c's -1 and 0.1 do not / do
    assert merged.tolist() == pytest.approx([6.0, -4.0, 5.0, 4.1])


def test_no_inputs_besides_the_base_gives_the_base():
    base, _ = task_vectors(0)
    for method in DETERMINISTIC + RANDOM:
        assert torch.equal(ours(method, base, [], []), base)


# ---- the random sparsifiers: deterministic under a seed, mergekit's distribution ------
def test_random_masks_follow_the_seed_and_the_density():
    delta = torch.randn(200, 300, generator=generator(5))
    first = keep_at_random(delta, {"density": 0.3}, False, generator(7))
    assert torch.equal(first, keep_at_random(delta, {"density": 0.3}, False, generator(7)))
    assert not torch.equal(first, keep_at_random(delta, {"density": 0.3}, False, generator(8)))
    assert abs((first != 0).float().mean().item() - 0.3) < 0.01
    rescaled = keep_at_random(delta, {"density": 0.3}, True, generator(7))
    torch.testing.assert_close(rescaled.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    assert torch.equal(keep_at_random(delta, {"density": 0.0}, True, generator(7)),
                       torch.zeros_like(delta))
    assert keep_at_random(delta, {"density": 1.0}, True, generator(7)) is delta


def kept_share_by_rank(delta: torch.Tensor, kept: torch.Tensor, buckets: int = 5) -> torch.Tensor:
    """The share of entries kept, per fifth of magnitude rank within each row."""
    bucket = (rank_fractions(delta.abs()) * buckets).clamp(max=buckets - 1).long()
    kept = kept != 0
    return torch.stack([kept[bucket == i].float().mean() for i in range(buckets)])


def test_della_keep_probability_rises_with_rank_like_mergekit():
    delta = torch.randn(300, 400, generator=generator(6))
    params = {"density": 0.5, "epsilon": 0.3}
    kept = keep_by_magnitude_rank(delta, params, False, generator(1))
    torch.manual_seed(1)
    reference = della_magprune(delta, 0.5, 0.3)
    ours_share, their_share = kept_share_by_rank(delta, kept), kept_share_by_rank(delta, reference)
    # rank fifths have mean keep probability 0.5 - 0.3 + 0.6 * (i + 0.5) / 5
    expected = torch.tensor([0.26, 0.38, 0.5, 0.62, 0.74])
    torch.testing.assert_close(ours_share, expected, rtol=0, atol=0.01)
    torch.testing.assert_close(ours_share, their_share, rtol=0, atol=0.015)
    rescaled = keep_by_magnitude_rank(delta, params, True, generator(1))
    torch.testing.assert_close(rescaled.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    one_dim = keep_by_magnitude_rank(delta[0], params, False, generator(1))
    assert one_dim.shape == delta[0].shape


def test_della_row_of_one_keeps_with_the_plain_density():
    # mergekit divides 0 by 0 here and fails; a lone entry is given probability `density`
    assert torch.equal(rank_fractions(torch.ones(5, 1)), torch.full((5, 1), 0.5))
    column = torch.randn(20000, 1, generator=generator(9))
    kept = keep_by_magnitude_rank(column, {"density": 0.4, "epsilon": 0.2}, False, generator(2))
    assert abs((kept != 0).float().mean().item() - 0.4) < 0.015


def test_dare_keep_share_matches_mergekit():
    delta = torch.randn(300, 400, generator=generator(10))
    torch.manual_seed(3)
    reference = bernoulli(delta, 0.2, "l1")
    kept = keep_at_random(delta, {"density": 0.2}, True, generator(3))
    assert abs((kept != 0).float().mean() - (reference != 0).float().mean()) < 0.005
    # L1 rescale: both scale the kept entries by |delta|_1 / |kept|_1, close to 1 / density
    scale = (kept[kept != 0] / delta[kept != 0]).mean()
    their_scale = (reference[reference != 0] / delta[reference != 0]).mean()
    assert abs(scale - their_scale) < 0.1 and abs(scale - 5) < 0.2


@pytest.mark.parametrize("method", RANDOM)
def test_expected_merge_matches_mergekit(method):
    """Elementwise means over many seeds agree within 5 standard errors."""
    base, models = task_vectors(3, shape=(6, 20), seed=11)
    inputs = [{"weight": 1.0, "density": 0.4}, {"weight": 0.6, "density": 0.7},
              {"weight": 0.8, "density": 0.5}]
    if method.startswith("della"):
        for entry, epsilon in zip(inputs, (0.3, 0.2, 0.1)):
            entry["epsilon"] = epsilon
    draws = 150
    ours_runs = torch.stack([ours(method, base, models, inputs, seed=s) for s in range(draws)])
    their_runs = []
    for s in range(draws):
        torch.manual_seed(s)
        their_runs.append(theirs(method, base, models, inputs))
    their_runs = torch.stack(their_runs)
    standard_error = ((ours_runs.var(0) + their_runs.var(0)) / draws).sqrt()
    gap = (ours_runs.mean(0) - their_runs.mean(0)).abs()
    assert (gap <= 5 * standard_error + 1e-6).all(), (gap / standard_error).max()
    assert standard_error.max() > 0          # the masks did vary


# ---- end to end on tiny Llama and Mistral models -------------------------------------
def program(method: str, a, b, c, *, node: str = "", b_params: str = "", c_params: str = "",
            settings: str = "") -> str:
    return f"""
model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
model c:
  source: hf "{c}"
merge m:
  method: {method}
  base: a
{node}
  inputs:
    b: {{{b_params}}}
    c: {{{c_params}}}
  dtype: float32
{settings}
output: m
"""


def compile_ours(text: str, out: Path) -> dict[str, torch.Tensor]:
    cfmlang.compile(text, out)
    return tensors(out)


def indent(lines: str) -> str:
    return "\n".join("  " + line for line in lines.strip().splitlines())


CASES = [
    # (method, arch, node-level lines, b params, c params, mergekit global, mergekit b, mergekit c)
    ("ties", "llama", "", "weight: [1.0, 0.3], density: [0.3, 0.8]", "weight: 0.6, density: 0.5",
     {}, {"weight": [1.0, 0.3], "density": [0.3, 0.8]}, {"weight": 0.6, "density": 0.5}),
    ("ties", "mistral", "rescale: true\nint8_mask: true\nnormalize: false\nlambda: [1.0, 0.5]\n"
     "density: 0.4", "weight: 0.7", "weight: 0.5, density: 0.9",
     {"rescale": True, "int8_mask": True, "normalize": False, "lambda": [1.0, 0.5], "density": 0.4},
     {"weight": 0.7}, {"weight": 0.5, "density": 0.9}),
    ("breadcrumbs", "llama", "gamma: 0.05", "weight: 1.0, density: 0.6", "weight: 0.5, gamma: [0.0, 0.2]",
     {"gamma": 0.05}, {"weight": 1.0, "density": 0.6}, {"weight": 0.5, "gamma": [0.0, 0.2]}),
    ("breadcrumbs", "mistral", "rescale: true\nnormalize: true\nlambda: 0.9", "weight: 1.0, density: 0.5",
     "weight: 0.3, density: [0.2, 0.9], gamma: 0.1",
     {"rescale": True, "normalize": True, "lambda": 0.9}, {"weight": 1.0, "density": 0.5},
     {"weight": 0.3, "density": [0.2, 0.9], "gamma": 0.1}),
    ("breadcrumbs_ties", "llama", "density: 0.7", "weight: 1.0, gamma: 0.02", "weight: -0.5",
     {"density": 0.7}, {"weight": 1.0, "gamma": 0.02}, {"weight": -0.5}),
    ("breadcrumbs_ties", "mistral", "normalize: true\nint8_mask: true", "weight: 1.0, density: 0.4",
     "weight: [0.2, 1.0], density: 0.6, gamma: 0.0",
     {"normalize": True, "int8_mask": True}, {"weight": 1.0, "density": 0.4},
     {"weight": [0.2, 1.0], "density": 0.6, "gamma": 0.0}),
    # tensor-name filter maps (mergekit's `filter:` conditions)
    ("ties", "llama", "lambda: {mlp: 0.5, default: 1.0}",
     "weight: 1.0, density: {self_attn: 0.3, mlp: [0.2, 0.8], default: 0.6}", "weight: 0.5",
     {"lambda": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]},
     {"weight": 1.0, "density": [{"filter": "self_attn", "value": 0.3},
                                 {"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.6}]},
     {"weight": 0.5}),
    ("breadcrumbs", "mistral", "", "weight: 1.0, density: 0.5, gamma: {down_proj: 0.2, default: 0.01}",
     "weight: {embed: 0.1, default: 0.7}, density: 0.8",
     {}, {"weight": 1.0, "density": 0.5,
          "gamma": [{"filter": "down_proj", "value": 0.2}, {"value": 0.01}]},
     {"weight": [{"filter": "embed", "value": 0.1}, {"value": 0.7}], "density": 0.8}),
]


@pytest.mark.parametrize("method,arch,node,b_params,c_params,mk_global,mk_b,mk_c", CASES,
                         ids=[f"{case[0]}-{case[1]}" for case in CASES])
def test_deterministic_methods_are_bit_identical_to_mergekit(tiny_zoo, tmp_path, method, arch, node,
                                                             b_params, c_params, mk_global, mk_b, mk_c):
    a, b, c = (tiny_zoo[f"{arch}_{n}"] for n in "abc")
    text = program(method, a, b, c, node=indent(node) if node else "", b_params=b_params,
                   c_params=c_params)
    got = compile_ours(text, tmp_path / "ours")
    expected = run_mergekit({"merge_method": method, "base_model": str(a), "dtype": "float32",
                             "parameters": mk_global,
                             "models": [{"model": str(b), "parameters": mk_b},
                                        {"model": str(c), "parameters": mk_c}]}, tmp_path / "mk")
    assert set(got) == set(expected)
    for name in got:
        assert torch.equal(got[name], expected[name]), name
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"],
                           tensors(a)["model.layers.0.mlp.up_proj.weight"])


def test_ties_at_full_density_is_task_arithmetic_with_sign_consensus(tiny_zoo, tmp_path):
    a, b, c = (tiny_zoo[f"llama_{n}"] for n in "abc")
    got = compile_ours(program("ties", a, b, c, b_params="weight: 1.0", c_params="weight: 1.0"),
                       tmp_path / "ours")
    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    for name, value in got.items():
        deltas = torch.stack([tb[name] - ta[name], tc[name] - ta[name]])
        agree = torch.sign(deltas) == torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
        kept = (deltas * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(value, ta[name] + kept, rtol=1e-6, atol=1e-7)


def single_input(method: str, a, b, params: str, node: str = "", seed_line: str = "") -> str:
    return f"""
model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
merge m:
  method: {method}
  base: a
{node}
  inputs:
    b: {{{params}}}
  dtype: float32
{seed_line}
output: m
"""


def kept_share(merged: dict, base: dict, name_filter=lambda name: True) -> float:
    changed = sum(int((merged[n] != base[n]).sum()) for n in merged if name_filter(n))
    total = sum(merged[n].numel() for n in merged if name_filter(n))
    return changed / total


@pytest.mark.parametrize("method,arch", [("dare_ties", "llama"), ("dare_linear", "mistral"),
                                         ("della", "mistral"), ("della_linear", "llama")])
def test_random_methods_are_deterministic_under_the_seed(tiny_zoo, tmp_path, method, arch):
    a, b, c = (tiny_zoo[f"{arch}_{n}"] for n in "abc")
    extra = ", epsilon: 0.1" if method.startswith("della") else ""
    text = program(method, a, b, c, b_params=f"weight: 1.0, density: 0.5{extra}",
                   c_params=f"weight: 0.5, density: [0.3, 0.7]{extra}", settings="seed: 3")
    paths = {}
    for label, variant in (("first", text), ("again", text),
                           ("other_seed", text.replace("seed: 3", "seed: 4")),
                           ("node_seed", text.replace("  dtype: float32", "  dtype: float32\n  seed: 3")
                            .replace("seed: 3\noutput", "seed: 9\noutput"))):
        cfmlang.compile(variant, tmp_path / label)
        paths[label] = (tmp_path / label / "model.safetensors").read_bytes()
    assert paths["first"] == paths["again"]
    assert paths["first"] != paths["other_seed"]
    assert paths["first"] == paths["node_seed"]      # a node's `seed:` overrides the file's
    manifest = json.loads((tmp_path / "first" / "cfm.json").read_text())
    assert manifest["nodes"]["m"]["method"] == method


@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_keep_the_density_like_mergekit(tiny_zoo, tmp_path, method):
    """One input, weight 1, no rescale: the merged model differs from the base exactly
    where the mask kept an entry. The density is a gradient across layers."""
    a, b = tiny_zoo["llama_a"], tiny_zoo["llama_b"]
    extra, mk_extra = (", epsilon: 0.15", {"epsilon": 0.15}) if method.startswith("della") else ("", {})
    got = compile_ours(single_input(method, a, b, f"weight: 1.0, density: [0.2, 0.8]{extra}",
                                    node="  rescale: false"), tmp_path / "ours")
    torch.manual_seed(0)
    expected = run_mergekit({"merge_method": method, "base_model": str(a), "dtype": "float32",
                             "parameters": {"rescale": False}, "models": [
                                 {"model": str(b), "parameters": {"weight": 1.0, "density": [0.2, 0.8],
                                                                  **mk_extra}}]}, tmp_path / "mk")
    ta, tb = tensors(a), tensors(b)
    for layer, density in ((0, 0.2), (3, 0.8)):
        in_layer = lambda name, layer=layer: layer_index(name) == layer   # noqa: E731
        assert abs(kept_share(got, ta, in_layer) - density) < 0.02, layer
        assert abs(kept_share(got, ta, in_layer) - kept_share(expected, ta, in_layer)) < 0.03, layer
    for name, value in got.items():       # kept entries are the input's, the rest the base's
        kept = value != ta[name]
        # a + (b - a) rounds differently from b in the last bit
        torch.testing.assert_close(value[kept], tb[name][kept], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_rescale_restores_each_task_vectors_l1_norm(tiny_zoo, tmp_path, method):
    a, b = tiny_zoo["mistral_a"], tiny_zoo["mistral_b"]
    got = compile_ours(single_input(method, a, b, "weight: 1.0, density: 0.3"), tmp_path / "ours")
    ta, tb = tensors(a), tensors(b)
    for name, value in got.items():
        delta, kept = tb[name] - ta[name], value - ta[name]
        torch.testing.assert_close(kept.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)
        assert (kept != 0).float().mean() < 0.5


# ---- diagnostics ----------------------------------------------------------------------
def diagnostics(text: str) -> list:
    with pytest.raises(CompileError) as caught:
        cfmlang.check(text)
    return caught.value.diagnostics


def test_della_density_and_epsilon_out_of_range_is_a_check_error(tiny_zoo):
    a, b, c = (tiny_zoo[f"llama_{n}"] for n in "abc")
    found = diagnostics(program("della", a, b, c, b_params="weight: 1.0, density: 0.9",
                                c_params="weight: 1.0, density: 0.5, epsilon: 0.5"))
    assert [d.code for d in found] == ["E032", "E032"]
    assert "density 0.9 and epsilon 0.15 give 0.75 and 1.05" in found[0].message
    assert found[0].message.startswith("invalid parameters: ")
    assert "density 0.5 and epsilon 0.5 give 0 and 1" in found[1].message
    found = diagnostics(program("della_linear", a, b, c, b_params="weight: 1.0, density: [0.5, 0.95]",
                                c_params="weight: 1.0"))
    assert [d.code for d in found] == ["E032"] and "t = 1" in found[0].message
    found = diagnostics(program("della", a, b, c, b_params="weight: 1.0, density: {mlp: 0.9, default: 0.5}",
                                c_params="weight: 1.0"))
    assert [d.code for d in found] == ["E032"] and "density 0.9 and epsilon 0.15" in found[0].message
    # when both are filter maps, only the merge knows which entries meet (here: all fine)
    cfmlang.compile(program("della", a, b, c, c_params="weight: 1.0",
                          b_params="weight: 1.0, density: {mlp: 0.9, default: 0.5}, "
                                   "epsilon: {mlp: 0.05, default: 0.3}"))
    # density 1 (no pruning) or 0 (drop all) needs no epsilon range
    cfmlang.check(program("della", a, b, c, b_params="weight: 1.0, density: 1.0, epsilon: 0.6",
                          c_params="weight: 1.0, density: 0.0"))


def test_della_gradient_out_of_range_between_its_points_fails_at_compile(tiny_zoo, tmp_path):
    a, b, c = (tiny_zoo[f"llama_{n}"] for n in "abc")
    # density 1.0 -> 0.5 passes at both ends, but layer 1 gets density 5/6 and 5/6 + 0.3 > 1
    text = program("della", a, b, c, b_params="weight: 1.0, density: [1.0, 0.5], epsilon: 0.3",
                   c_params="weight: 1.0")
    cfmlang.check(text)
    with pytest.raises(CompileError) as caught:
        cfmlang.compile(text, tmp_path / "out")
    (problem,) = caught.value.diagnostics
    assert problem.code == "E080" and "model.layers.1." in problem.message
    assert "density - epsilon and density + epsilon" in problem.message
    assert problem.span is not None and "on every layer" in problem.help[0]
    assert not (tmp_path / "out").exists()
    # two filter maps whose entries meet only on the mlp tensors: 0.9 with 0.3
    text = program("della_linear", a, b, c, c_params="weight: 1.0",
                   b_params="weight: 1.0, density: {mlp: 0.9, default: 0.5}, "
                            "epsilon: {self_attn: 0.05, default: 0.3}")
    with pytest.raises(CompileError) as caught:
        cfmlang.compile(text, tmp_path / "out")
    (problem,) = caught.value.diagnostics
    assert problem.code == "E080" and ".mlp." in problem.message


@pytest.mark.parametrize("method,key", [("ties", "gamma"), ("ties", "epsilon"),
                                        ("dare_linear", "gamma"), ("breadcrumbs", "epsilon"),
                                        ("della", "gamma")])
def test_parameters_of_other_methods_are_unknown(tiny_zoo, method, key):
    a, b, c = (tiny_zoo[f"llama_{n}"] for n in "abc")
    found = diagnostics(program(method, a, b, c, b_params=f"weight: 1.0, {key}: 0.1",
                                c_params="weight: 1.0"))
    assert [d.code for d in found] == ["E013"] and key in found[0].message


@pytest.mark.parametrize("method", DETERMINISTIC + RANDOM)
def test_base_and_weight_are_required(tiny_zoo, method):
    a, b, c = (tiny_zoo[f"llama_{n}"] for n in "abc")
    text = program(method, a, b, c, b_params="weight: 1.0", c_params="density: 0.5")
    found = diagnostics(text.replace("  base: a\n", ""))
    assert sorted(d.code for d in found) == ["E014", "E014"]
    assert any("needs a `base:`" in d.message for d in found)
    assert any("missing parameter `weight`" in d.message for d in found)


def test_node_level_options_are_typed(tiny_zoo):
    a, b, c = (tiny_zoo[f"llama_{n}"] for n in "abc")
    found = diagnostics(program("ties", a, b, c, node="  rescale: 1\n  lambda: \"x\"",
                                b_params="weight: 1.0", c_params="weight: 1.0"))
    assert sorted(d.code for d in found) == ["E032", "E032"]


def test_largest_mask_selection_equals_the_full_sort():
    """The kthvalue shortcut keeps exactly the argsort's set, with and without ties."""
    from cfmlang.ops.merge.sparse import largest_mask

    generator = torch.Generator().manual_seed(3)
    for values in (torch.rand(5000, generator=generator),
                   torch.randint(0, 7, (5000,), generator=generator).float(),   # many ties
                   torch.zeros(100)):
        for count in (1, 17, 2500, 4999, 5000):
            count = min(count, values.numel())
            expected = torch.zeros(values.numel(), dtype=torch.bool)
            expected[torch.argsort(values, descending=True)[:count]] = True
            assert torch.equal(largest_mask(values, count), expected), (values[:5], count)
