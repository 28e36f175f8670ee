"""cfmlang's native packed-linear kernels (`runtime/kernels/packed_linear.cpp`): the weights
they rebuild are the float32 block values bit for bit, their products are float32 products
in another order, in the AVX-512 form and in the portable one, and a machine that cannot
build them gets a diagnostic."""
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


@pytest.fixture(scope="module")
def portable():
    """The portable kernels (no AVX-512), built beside the native ones under `cfmlang_portable`."""
    path = native.library_path(("-mno-avx512f", "-DCFM_OPS_NAMESPACE=cfmlang_portable"))
    torch.ops.load_library(str(path))
    return torch.ops.cfmlang_portable


@pytest.fixture(scope="module")
def kernels(portable):
    native.load()
    return {"native": torch.ops.cfmlang, "portable": portable}


@pytest.mark.parametrize("form", ["native", "portable"])
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_the_rebuilt_weights_are_the_block_values_and_products_are_float32_products(kernels, form, kind):
    rows = 37                       # not a multiple of the threads' grain (16) nor of 2 rows at a time
    inputs = 192 if kind == "q4_1" else 160     # Q8_0 takes any whole number of blocks, Q4_1 an even one
    ops = kernels[form]
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
