"""model_stock, nearswap, sce, arcee_fusion, ram, ramplus_tl and passthrough: against
mergekit 0.1.5 on tiny Llama and Mistral models, plus input counts and seeded sampling."""
from __future__ import annotations

import pytest
import torch

import cfmlang
from cfmlang.diagnostics import CompileError
from cfmlang.ops import lookup
from cfmlang.ops.merge.base import MergeContext
from cfmlang.ops.merge.other import QUANTILE_SAMPLE_SIZE, outlier_threshold, require_input_count
from mergekit_oracle import run_mergekit, tensors


def brick(models: dict, method: str, inputs: list[str], base: str | None = None,
          options: str = "", per_input: dict | None = None) -> str:
    """A .brick program merging `inputs` (names of `models`) into its output."""
    lines = [f'model {name}:\n  source: hf "{path}"' for name, path in models.items()]
    lines += [f"merge out:\n  method: {method}"]
    if base:
        lines.append(f"  base: {base}")
    lines += [f"  {line}" for line in options.strip().splitlines()]
    lines.append("  inputs:")
    lines += [f"    {name}: {(per_input or {}).get(name, '{}')}" for name in inputs]
    lines.append("  dtype: float32\noutput: out\n")
    return "\n".join(lines)


def mergekit_config(models: dict, method: str, inputs: list[str], base: str | None = None,
                    parameters: dict | None = None, per_input: dict | None = None) -> dict:
    config = {"merge_method": method, "dtype": "float32", "models": [
        {"model": str(models[name]), **({"parameters": per_input[name]}
                                        if per_input and name in per_input else {})}
        for name in inputs]}
    if base:
        config["base_model"] = str(models[base])
    if parameters:
        config["parameters"] = parameters
    return config


def compile_and_compare(tmp_path, models, method, inputs, base=None, options="",
                        per_input_brick=None, parameters=None, per_input_mk=None):
    """Compile with cfmlang and run mergekit on the same merge; assert bit-identical."""
    result = cfmlang.compile(brick(models, method, inputs, base, options, per_input_brick),
                             tmp_path / "ours")
    theirs = run_mergekit(mergekit_config(models, method, inputs, base, parameters, per_input_mk),
                          tmp_path / "mk")
    ours = tensors(tmp_path / "ours")
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    return ours, result


def zoo(tiny_zoo, arch: str) -> dict:
    return {name: tiny_zoo[f"{arch}_{name}"] for name in "abc"}


def differs_from_every_input(ours: dict, models: dict, name: str) -> bool:
    merged = ours[name]
    return all(not torch.equal(merged, tensors(path)[name]) for path in models.values())


# ---- model_stock -------------------------------------------------------------------------

@pytest.mark.parametrize("arch,filter_wise", [("llama", False), ("mistral", True)])
def test_model_stock_matches_mergekit(tiny_zoo, tmp_path, arch, filter_wise):
    models = zoo(tiny_zoo, arch)
    flag = str(filter_wise).lower()
    ours, _ = compile_and_compare(tmp_path, models, "model_stock", ["b", "c"], base="a",
                                  options=f"filter_wise: {flag}",
                                  parameters={"filter_wise": filter_wise})
    assert differs_from_every_input(ours, models, "model.layers.1.mlp.up_proj.weight")


def test_model_stock_formula_for_one_vector():
    """Two orthogonal unit offsets: cos 0, so the ratio is 0 and the base is kept; two
    equal offsets: cos 1, ratio 2 * 1 / (1 + 1) = 1, so the average."""
    stock = lookup("merge", "model_stock")
    context = MergeContext("m", "x", 0)
    base = torch.zeros(2)
    orthogonal = stock.merge([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], base,
                             [{}, {}], {"filter_wise": False}, context)
    assert torch.equal(orthogonal, base)
    same = stock.merge([torch.tensor([1.0, 2.0])] * 2, base, [{}, {}], {"filter_wise": False}, context)
    assert torch.equal(same, torch.tensor([1.0, 2.0]))


# ---- nearswap ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,t", [("llama", 0.01), ("mistral", [0.001, 0.03])])
def test_nearswap_matches_mergekit(tiny_zoo, tmp_path, arch, t):
    models = zoo(tiny_zoo, arch)
    ours, _ = compile_and_compare(tmp_path, models, "nearswap", ["b"], base="a",
                                  options=f"t: {t}", parameters={"t": t})
    assert differs_from_every_input(ours, models, "model.layers.2.self_attn.q_proj.weight")


def test_nearswap_needs_t(tiny_zoo, tmp_path):
    models = zoo(tiny_zoo, "llama")
    with pytest.raises(CompileError) as caught:
        cfmlang.compile(brick(models, "nearswap", ["b"], base="a"), tmp_path / "out")
    assert any(d.code == "E014" and "`t`" in d.message for d in caught.value.diagnostics)


# ---- sce -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,select_topk,int8_mask", [
    ("llama", None, False), ("mistral", 0.5, True), ("llama", [0.2, 0.9], False)])
def test_sce_matches_mergekit(tiny_zoo, tmp_path, arch, select_topk, int8_mask):
    models = zoo(tiny_zoo, arch)
    options = f"int8_mask: {str(int8_mask).lower()}"
    parameters = {"int8_mask": int8_mask}
    if select_topk is not None:
        options += f"\nselect_topk: {select_topk}"
        parameters["select_topk"] = select_topk
    ours, _ = compile_and_compare(tmp_path, models, "sce", ["b", "c"], base="a",
                                  options=options, parameters=parameters)
    assert differs_from_every_input(ours, models, "model.layers.3.mlp.down_proj.weight")


@pytest.mark.parametrize("method", ["sce", "ram", "ramplus_tl"])
def test_a_merge_of_the_base_alone_is_the_base(tiny_zoo, tmp_path, method):
    """The base listed among the inputs is dropped from them, leaving none: mergekit
    allows that for these methods and returns the base."""
    models = zoo(tiny_zoo, "mistral")
    ours, _ = compile_and_compare(tmp_path, models, method, ["a"], base="a")
    base = tensors(models["a"])
    assert all(torch.equal(ours[n], base[n]) for n in base)


# ---- arcee_fusion ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_arcee_fusion_matches_mergekit(tiny_zoo, tmp_path, arch):
    models = zoo(tiny_zoo, arch)
    ours, _ = compile_and_compare(tmp_path, models, "arcee_fusion", ["b"], base="a")
    name = "model.layers.0.mlp.gate_proj.weight"
    base, tuned = tensors(models["a"])[name], tensors(models["b"])[name]
    from_tuned = torch.isclose(ours[name], tuned) & ~torch.isclose(base, tuned)
    assert 0 < from_tuned.float().mean() < 0.5   # only the outliers are taken


def test_arcee_fusion_samples_large_tensors_with_the_seeded_generator():
    """Above QUANTILE_SAMPLE_SIZE elements the quartiles come from a random sample:
    seeded per (seed, node, tensor), and close to the exact quartiles' fence (mergekit
    draws the same-size sample from torch's global generator)."""
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion

    importance = torch.rand(QUANTILE_SAMPLE_SIZE + 200_000, generator=torch.Generator().manual_seed(3)) ** 3
    def fence(seed):
        return outlier_threshold(importance, MergeContext("m", "t", seed).generator())
    assert torch.equal(fence(1), fence(1))
    assert not torch.equal(fence(1), fence(2))
    ordered = importance.sort().values
    q1, median, q3 = (ordered[int(q * (len(ordered) - 1))] for q in (0.25, 0.5, 0.75))
    exact = median + 1.5 * (q3 - q1)
    torch.manual_seed(0)
    theirs = DynamicThresholdFusion().calculate_dynamic_threshold(importance)
    for value in (fence(1), fence(2), theirs):
        assert abs(float(value) - float(exact)) < 1e-2 * float(exact)   # sampling error ~0.2%

    fusion = lookup("merge", "arcee_fusion")
    base = torch.randn(1100, 1000, generator=torch.Generator().manual_seed(4))
    tuned = base + 0.01 * torch.randn(1100, 1000, generator=torch.Generator().manual_seed(5))
    def merged(seed):
        return fusion.merge([tuned], base, [{}], {}, MergeContext("m", "w", seed))
    assert torch.equal(merged(7), merged(7))
    taken = (merged(7) == tuned).float().mean()
    torch.manual_seed(0)
    from mergekit.merge_methods.arcee_fusion import arcee_fusion_merge_method
    from mergekit.merge_methods.base import TensorGroup
    (theirs,) = arcee_fusion_merge_method((TensorGroup.from_tensors([base, tuned], base_index=0),))
    assert abs(float(taken) - float((theirs == tuned).float().mean())) < 0.002


# ---- ram and ramplus_tl ----------------------------------------------------------------------

@pytest.mark.parametrize("arch,epsilon", [("llama", None), ("mistral", 0.02), ("llama", [0.005, 0.03])])
def test_ram_matches_mergekit(tiny_zoo, tmp_path, arch, epsilon):
    models = zoo(tiny_zoo, arch)
    options = "" if epsilon is None else f"epsilon: {epsilon}"
    parameters = None if epsilon is None else {"epsilon": epsilon}
    ours, _ = compile_and_compare(tmp_path, models, "ram", ["b", "c"], base="a",
                                  options=options, parameters=parameters)
    assert differs_from_every_input(ours, models, "model.layers.1.self_attn.o_proj.weight")


@pytest.mark.parametrize("arch,options,parameters", [
    ("mistral", "", None),
    ("llama", "r: 0.5\nalpha: [0.1, 0.9]\nepsilon: 0.02", {"r": 0.5, "alpha": [0.1, 0.9], "epsilon": 0.02})])
def test_ramplus_tl_matches_mergekit(tiny_zoo, tmp_path, arch, options, parameters):
    models = zoo(tiny_zoo, arch)
    compile_and_compare(tmp_path, models, "ramplus_tl", ["b", "c"], base="a",
                        options=options, parameters=parameters)


def test_ram_keeps_unique_entries_and_averages_shared_ones():
    ram = lookup("merge", "ram")
    base = torch.zeros(4)
    first, second = torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([3.0, 5.0, 0.0, 0.0])
    merged = ram.merge([first, second], base, [{}, {}], {"epsilon": 1e-5}, MergeContext("m", "x", 0))
    assert torch.equal(merged, torch.tensor([2.0, 5.0, 2.0, 0.0]))


# ---- passthrough -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,scale", [("llama", None), ("mistral", 0.5), ("llama", [1.0, 0.0, 2.0])])
def test_passthrough_matches_mergekit(tiny_zoo, tmp_path, arch, scale):
    models = zoo(tiny_zoo, arch)
    brick_params = {} if scale is None else {"b": f"{{scale: {scale}}}"}
    mk_params = {} if scale is None else {"b": {"scale": scale}}
    ours, _ = compile_and_compare(tmp_path, models, "passthrough", ["b"],
                                  per_input_brick=brick_params, per_input_mk=mk_params)
    if scale is None:
        source = tensors(models["b"])
        assert all(torch.equal(ours[n], source[n]) for n in source)


def test_passthrough_scale_by_tensor_filter(tiny_zoo, tmp_path):
    """mergekit's `[{filter: o_proj, value: 0}, {value: 1}]` is our filter map."""
    models = zoo(tiny_zoo, "mistral")
    ours, _ = compile_and_compare(
        tmp_path, models, "passthrough", ["c"], options="scale: {o_proj: 0.0, default: 1.0}",
        parameters={"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]})
    assert not ours["model.layers.2.self_attn.o_proj.weight"].any()
    assert ours["model.layers.2.self_attn.q_proj.weight"].any()


# ---- shared behaviour --------------------------------------------------------------------------

@pytest.mark.parametrize("method,options", [("ram", "epsilon: 0.02"), ("nearswap", "t: 0.01"),
                                            ("passthrough", "")])
def test_elementwise_methods_give_the_same_bytes_in_row_blocks(tiny_zoo, tmp_path, method, options):
    models = zoo(tiny_zoo, "llama")
    base, inputs = (None, ["b"]) if method == "passthrough" else ("a", ["b"])
    text = brick(models, method, inputs, base, options)
    cfmlang.compile(text, tmp_path / "whole")
    cfmlang.compile(text, tmp_path / "blocks", chunk_bytes=300)
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (tmp_path / "blocks" / "model.safetensors").read_bytes() == whole


@pytest.mark.parametrize("method,inputs,base,wanted", [
    ("model_stock", ["b"], "a", "at least 2 inputs besides the base"),
    ("nearswap", ["b", "c"], "a", "exactly 1 input besides the base"),
    ("arcee_fusion", ["b", "c"], "a", "exactly 1 input besides the base"),
    ("passthrough", ["b", "c"], None, "exactly 1 input")])
def test_input_counts_are_refused(tiny_zoo, tmp_path, method, inputs, base, wanted):
    models = zoo(tiny_zoo, "llama")
    options = "t: 0.01" if method == "nearswap" else ""
    with pytest.raises(CompileError) as caught:
        cfmlang.compile(brick(models, method, inputs, base, options), tmp_path / "out")
    assert any(d.code == "E034" and method in d.message for d in caught.value.diagnostics)
    entry = lookup("merge", method)
    with pytest.raises(ValueError, match=f"`{method}` takes {wanted}, got {len(inputs)}"):
        require_input_count(entry, [torch.zeros(1)] * len(inputs))


def test_passthrough_takes_no_base(tiny_zoo, tmp_path):
    models = zoo(tiny_zoo, "llama")
    with pytest.raises(CompileError) as caught:
        cfmlang.compile(brick(models, "passthrough", ["b"], base="a"), tmp_path / "out")
    assert any(d.code == "E013" and "base" in d.message for d in caught.value.diagnostics)


@pytest.mark.parametrize("method,options,parameters", [
    ("model_stock", "", {}), ("nearswap", "t: 0.01", {"t": 0.01}),
    ("sce", "select_topk: 0.5", {"select_topk": 0.5}), ("arcee_fusion", "", {}),
    ("ram", "epsilon: 0.02", {"epsilon": 0.02}), ("ramplus_tl", "epsilon: 0.02", {"epsilon": 0.02})])
def test_bfloat16_inputs_without_dtype_compute_in_bfloat16(tmp_path, method, options, parameters):
    """Without `dtype:` both compute in the inputs' dtype. mergekit then writes whatever
    dtype the result has: arcee_fusion (a float32 mask) and ramplus_tl (a float32
    boost) come out float32 although its config.json says bfloat16; we keep bfloat16,
    and the values are theirs rounded to it."""
    from models import tiny_model

    models = {n: tiny_model(tmp_path / n, seed, dtype=torch.bfloat16) for n, seed in zip("abc", (1, 11, 21))}
    inputs = ["b"] if method in ("nearswap", "arcee_fusion") else ["b", "c"]
    text = brick(models, method, inputs, "a", options).replace("  dtype: float32\n", "")
    cfmlang.compile(text, tmp_path / "ours")
    config = mergekit_config(models, method, inputs, "a", parameters)
    del config["dtype"]
    theirs = run_mergekit(config, tmp_path / "mk")
    ours = tensors(tmp_path / "ours")
    for name in ours:
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], theirs[name].to(torch.bfloat16)), name
