"""cfmlang's native packed-linear kernels (`runtime/kernels/packed_linear.cpp`): the weights
they rebuild are the float32 block values bit for bit, their products are float32 products
in another order, in the native form (AVX-512 where the CPU has it), the AVX2 one and the
portable one, and a machine that cannot build them gets a diagnostic."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cfmlang.runtime import native

BLOCK = 32


def q4_1_codes(rows: int, inputs: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, inputs // 2), dtype=torch.uint8, generator=generator)
    scale = (torch.rand(rows, inputs // BLOCK, generator=generator) * 0.02).half()
    offset = (-torch.rand(rows, inputs // BLOCK, generator=generator) * 0.1).half()
    values = torch.cat((codes & 15, codes >> 4), dim=1).double().view(rows, -1, BLOCK)
    weight = values * scale.double()[..., None] + offset.double()[..., None]
    numbers = torch.stack((scale, offset), dim=-1).view(torch.uint8).reshape(rows, -1)
    return torch.cat((codes, numbers), dim=1), weight.reshape(rows, inputs).float()   # d*q + m rounded once


def q8_0_codes(rows: int, inputs: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (rows, inputs), dtype=torch.int8, generator=generator)
    scale = (torch.rand(rows, inputs // BLOCK, generator=generator) * 0.02).half()
    weight = codes.float().view(rows, -1, BLOCK) * scale.float()[..., None]
    return torch.cat((codes.view(torch.uint8), scale.view(torch.uint8)), dim=1), weight.reshape(rows, inputs)


FORMS = ["native", "avx2", "portable"]


def built_form(namespace: str, *flags: str):
    """The kernels built with `flags` under the op namespace `namespace` (beside the native ones)."""
    torch.ops.load_library(str(native.library_path((*flags, f"-DCFM_OPS_NAMESPACE={namespace}"))))
    return getattr(torch.ops, namespace)


@pytest.fixture(scope="module")
def kernels():
    native.load()
    forms = {"native": torch.ops.cfmlang,
             "portable": built_form("cfmlang_portable", "-mno-avx512f", "-mno-avx2")}
    if " avx2" in native.cpu_signature() and " fma" in native.cpu_signature():
        forms["avx2"] = built_form("cfmlang_avx2", "-mno-avx512f")
    return forms


def form_of(kernels, form: str):
    if form not in kernels:
        pytest.skip(f"this CPU cannot run the {form} form")
    return kernels[form]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_the_rebuilt_weights_are_the_block_values_and_products_are_float32_products(kernels, form, kind):
    rows = 37                       # not a multiple of the threads' grain (16) nor of 2 rows at a time
    inputs = 192 if kind == "q4_1" else 160     # Q8_0 takes any whole number of blocks, Q4_1 an even one
    ops = form_of(kernels, form)
    if kind == "q4_1":
        packed, weight = q4_1_codes(rows, inputs, seed=3)
        run = lambda x: ops.q4_1_linear(x, packed)  # noqa: E731
    else:
        packed, weight = q8_0_codes(rows, inputs, seed=4)
        run = lambda x: ops.q8_0_linear(x, packed)  # noqa: E731
    # unit rows: each output is one weight times 1 plus products with 0, so exact
    assert torch.equal(run(torch.eye(inputs)).T, weight)
    for count in (1, 2, 3, 5, 6, 7):
        x = torch.randn(count, inputs, generator=torch.Generator().manual_seed(count))
        exact = x.double() @ weight.double().T
        size = x.abs().double() @ weight.abs().double().T
        error = ((run(x).double() - exact).abs() / size).max().item()
        assert error < inputs * 2**-24, f"{count} rows: relative error {error:.2e}"
        assert error > 0 or count == 1     # float32 sums, not float64 ones (a wrong test would pass)


def test_every_thread_count_gives_the_same_bits(kernels):
    packed, _ = q4_1_codes(300, 576, seed=5)
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(6))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels["native"].q4_1_linear(x, packed)
        torch.set_num_threads(2)
        two = kernels["native"].q4_1_linear(x, packed)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_mismatched_shapes_are_refused_by_the_kernel(kernels):
    packed, _ = q4_1_codes(8, 64, seed=7)
    with pytest.raises(RuntimeError, match="x's K and the rows' width disagree"):
        kernels["native"].q4_1_linear(torch.zeros(1, 128), packed)


def test_a_machine_without_a_compiler_gets_a_diagnostic(tmp_path):
    env = {**os.environ, "CXX": "no-such-compiler-here", "CFM_KERNEL_CACHE": str(tmp_path)}
    code = ("from cfmlang.diagnostics import CompileError, render_plain\n"
            "from cfmlang.runtime import native\n"
            "try:\n    native.load()\nexcept CompileError as exc:\n    print(render_plain(exc.diagnostics))\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "E245" in done.stdout and "no-such-compiler-here" in done.stdout and "--decode-kernel bf16" in done.stdout
    assert list(tmp_path.iterdir()) == []          # nothing half-built left in the cache


def routed_weights(seed: int, hidden: int = 128, neurons: int = 128, width: int = 16):
    """A routed FFN's packed tensors (see runtime.packed_routed) and the float32 weights they
    stand for: gate/up rows `rows_weight` [2N, hidden] (expert e's gate rows, then its up
    rows), and down columns `columns` [N, hidden] (neuron n's column)."""
    generator = torch.Generator().manual_seed(seed)
    rows, rows_weight = q4_1_codes(2 * neurons, hidden, seed)
    codes = torch.randint(0, 256, (neurons, hidden // 2), dtype=torch.uint8, generator=generator)
    blocks = neurons // BLOCK
    numbers = torch.stack((torch.rand(blocks, hidden, generator=generator) * 0.02,
                           -torch.rand(blocks, hidden, generator=generator) * 0.1), dim=1).half()
    block_of = torch.randperm(neurons, generator=generator).div(BLOCK, rounding_mode="floor").to(torch.int32)
    per_output = torch.cat((codes & 15, codes >> 4), dim=1).double()                # [N, hidden]
    chosen = numbers[block_of.long()].double()                                     # [N, 2, hidden]
    columns = (per_output * chosen[:, 0] + chosen[:, 1]).float()
    return (rows, codes, numbers, block_of), rows_weight, columns, width


@pytest.mark.parametrize("form", FORMS)
def test_the_routed_gather_and_columns_read_the_chosen_experts_weights(kernels, form):
    (rows, codes, numbers, block_of), rows_weight, columns, width = routed_weights(seed=8)
    ops = form_of(kernels, form)
    # six tokens, three experts each; expert 3 chosen by five of them (read once per 4 tokens)
    batch = torch.tensor([[0, 3, 5], [7, 2, 4], [3, 0, 6], [5, 3, 1], [0, 7, 3], [3, 6, 2]])
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(9))
    pre = ops.q4_1_gather(x, rows, batch, 2 * width)           # gate/up rows: width*2 per expert
    expected_rows = torch.stack([rows_weight.view(8, 2 * width, 128)[batch[t]].reshape(-1, 128) for t in range(6)])
    expected = torch.einsum("tk,trk->tr", x.double(), expected_rows.double())
    assert (pre.double() - expected).abs().max() < 1e-5
    # a token's sums do not depend on the batch it came in
    alone = torch.cat([ops.q4_1_gather(x[t:t + 1], rows, batch[t:t + 1], 2 * width) for t in range(6)])
    assert torch.equal(pre, alone)
    index, x = batch[:2], x[:2]
    # one active neuron of weight 1: its down column, bit for bit
    for t, neuron in ((0, 3 * width + 5), (1, 7 * width + 15)):
        a = torch.zeros(1, 3 * width)
        position = list(index[t]).index(neuron // width) * width + neuron % width
        a[0, position] = 1.0
        assert torch.equal(ops.q4_1_columns(a, codes, numbers, block_of, index[t:t + 1], width)[0], columns[neuron])
    a = torch.randn(2, 3 * width, generator=torch.Generator().manual_seed(10))
    neurons = (index.unsqueeze(-1) * width + torch.arange(width)).view(2, -1)
    expected = torch.stack([a[t].double() @ columns[neurons[t]].double() for t in range(2)])
    assert (ops.q4_1_columns(a, codes, numbers, block_of, index, width).double() - expected).abs().max() < 1e-5


def test_the_routed_columns_sum_the_same_whatever_the_thread_count(kernels):
    (_, codes, numbers, block_of), _, _, width = routed_weights(seed=11, hidden=576, neurons=256)
    index = torch.tensor([[1, 4, 9, 12]])
    a = torch.randn(1, 4 * width, generator=torch.Generator().manual_seed(12))
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(kernels["native"].q4_1_columns(a, codes, numbers, block_of, index, width))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*results)
    # every form sums each output over the same neurons in the same order: the same bits
    for form in kernels.values():
        assert torch.equal(form.q4_1_columns(a, codes, numbers, block_of, index, width), results[0])


def test_the_bf16_kernel_packs_without_building_the_native_kernels(tmp_path):
    """E245's hint (`--decode-kernel bf16`) holds: packing for torch's int4 kernel builds
    nothing, so a machine without a compiler for cfmlang's kernels can use it."""
    env = {**os.environ, "CXX": "no-such-compiler-here", "CFM_KERNEL_CACHE": str(tmp_path)}
    code = ("import torch\n"
            "from cfmlang.runtime.packed_linear import KernelLinear, PackedLinear\n"
            "codes = torch.randint(0, 256, (16, 32), dtype=torch.uint8)\n"
            "scale, offset = torch.full((16, 2), 0.01).half(), torch.full((16, 2), -0.05).half()\n"
            "layer = KernelLinear.from_packed(PackedLinear('q4_1', codes, scale, offset, None))\n"
            "print(tuple(layer(torch.randn(1, 64)).shape))\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 16)"
    assert list(tmp_path.iterdir()) == []
