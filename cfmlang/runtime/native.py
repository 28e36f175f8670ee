"""cfmlang's native CPU kernels (`kernels/*.cpp`): built once per machine, loaded as torch ops.

The kernels are compiled with the C++ compiler Inductor already needs (`$CXX`, else `g++`),
for this CPU (`-march=native`), against the installed torch, into
`$CFM_KERNEL_CACHE` (default `~/.cache/cfmlang/kernels/`), under a name that hashes the
source, the compiler command, torch's version and the CPU's instruction sets: a change of
any of them (a home folder shared by machines of another CPU included) builds anew.
The build writes to a temporary file and renames it into place, so concurrent builds never
load a half-written library. Loading registers `torch.ops.cfmlang.*`; ahead-of-time
programs that call these ops (the inductor decode program) need them loaded first.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from cfmlang.diagnostics import CompileError, error

SOURCE = Path(__file__).with_name("kernels") / "packed_linear.cpp"
_loaded: Path | None = None


class KernelBuildError(RuntimeError):
    """The native kernels could not be compiled (the message holds the compiler's first lines)."""


def cache_dir() -> Path:
    return Path(os.environ.get("CFM_KERNEL_CACHE") or Path.home() / ".cache" / "cfmlang" / "kernels")


def compiler() -> str:
    name = os.environ.get("CXX") or "g++"
    if shutil.which(name) is None:
        raise KernelBuildError(f"no C++ compiler `{name}` on PATH (set CXX); Inductor needs one too")
    return name


def cpu_signature() -> str:
    """The CPU's instruction-set flags (Linux), else the machine name: what `-march=native` reads."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line for line in info if line.startswith("flags")), platform.machine())
    except OSError:
        return platform.machine()


def build_command(source: Path, target: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The compiler command that builds `source` into the shared library `target`; `extra`
    flags come last (the tests build the portable kernels with `-mno-avx512f`)."""
    from torch.utils import cpp_extension

    abi = int(torch.compiled_with_cxx11_abi())
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    libraries = [f"-L{path}" for path in cpp_extension.library_paths()]
    rpaths = [f"-Wl,-rpath,{path}" for path in cpp_extension.library_paths()]
    return [compiler(), str(source), "-o", str(target), "-shared", "-fPIC", "-O3", "-march=native",
            "-fopenmp", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, *libraries, *rpaths,
            "-lc10", "-ltorch", "-ltorch_cpu", *extra]


def library_path(extra: tuple[str, ...] = ()) -> Path:
    """The built library for this source, compiler, flags and torch (built now if missing)."""
    command = build_command(SOURCE, Path("OUT"), extra)
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *command, torch.__version__, cpu_signature()]).encode())
    target = cache_dir() / f"cfmlang_kernels_{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        partial = Path(work) / target.name
        result = subprocess.run(build_command(SOURCE, partial, extra), capture_output=True, text=True)
        if result.returncode != 0:
            first = "\n".join((result.stderr or result.stdout).strip().splitlines()[:8])
            raise KernelBuildError(f"compiling {SOURCE.name} failed:\n{first}")
        os.replace(partial, target)
    return target


def load() -> None:
    """Register `torch.ops.cfmlang.*` in this process (building the library on first use);
    E245 when it cannot be built."""
    global _loaded
    if _loaded is not None:
        return
    try:
        path = library_path()
    except (KernelBuildError, OSError) as exc:
        raise CompileError([error("E245", f"cfmlang's native CPU kernels (packed decode weights) could not be "
                                  f"built: {exc}", None,
                                  "install g++ (or set CXX), or compile with `--decode-kernel bf16` or "
                                  "`--no-pack`")]) from None
    torch.ops.load_library(str(path))
    register_shapes()
    _loaded = path


def register_shapes() -> None:
    """The ops' output shapes for tracing (`torch.export` runs them on fake tensors)."""
    for op in ("cfmlang::q4_1_linear", "cfmlang::q8_0_linear"):
        torch.library.register_fake(op)(lambda x, rows: x.new_empty(x.shape[0], rows.shape[0]))
    torch.library.register_fake("cfmlang::q4_1_gather")(
        lambda x, rows, index, width: x.new_empty(x.shape[0], index.shape[1] * width))
    torch.library.register_fake("cfmlang::q4_1_columns")(
        lambda a, codes, numbers, block_of, index, width: a.new_empty(a.shape[0], 2 * codes.shape[1]))
