"""llama.cpp for the benchmarks: found in a cache folder, or built there from source once.

The source is the llama.cpp that the `llama-cpp-python` sdist on PyPI vendors (pip
downloads the sdist; nothing else is fetched). It is unpacked under
`$CFM_BENCH_CACHE/src/` (default `~/.cache/cfmlang-bench/src/`) and built with CMake
(Release, native CPU flags, shared libraries, no network code) into
`$CFM_BENCH_CACHE/llama.cpp/build-<sdist version>/`, outside the repository: libllama,
`llama-simple` and `llama-quantize`, llama.cpp's own quantizer (a build on 2 busy cores takes tens of minutes; later runs reuse it). Beside
them, `benchmarks/llamacpp_decode.cpp` is compiled against that libllama into
`cfm-llama-decode`: greedy decoding through llama.cpp's C API with a chosen thread count,
timed in-process and printing the token ids (`llama-simple` prints text only and takes no
thread count; `llama-bench` needs llama.cpp's `common` library too, 60 more files).

    python benchmarks/llamacpp.py [--jobs 2]     # find or build; prints the tools' folder

Functions used by the benchmark scripts:
- `tools()`: the folder holding the built tools;
- `decode(bin, gguf, text, threads, n, rounds)`: `cfm-llama-decode`'s greedy tokens and
  prefill/decode seconds per round;
- `forced_logits(bin, gguf, ids, threads)`: llama.cpp's logits at every position of the
  token ids `ids`, evaluated in one batch (teacher forcing);
- `quantize(bin, source, out, kind)`: `llama-quantize` writes `source` quantized to `kind`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

TOOLS = ("llama-simple", "llama-quantize")
DRIVER = "cfm-llama-decode"
DRIVER_SOURCE = Path(__file__).with_name("llamacpp_decode.cpp")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON",
               # ggml's AMX matmul (compiled in by -march=native where the CPU lists AMX) died with
               # SIGILL at its first `tilezero` on a Xeon here; its AVX-512 kernels run instead
               "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
               "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")


def cache_root() -> Path:
    return Path(os.environ.get("CFM_BENCH_CACHE") or Path.home() / ".cache" / "cfmlang-bench")


def tools(jobs: int = 2, root: Path | None = None, log=print) -> Path:
    """The folder of the built llama.cpp tools; downloads and builds on first use."""
    root = root or cache_root()
    built = sorted((root / "llama.cpp").glob("build-*/bin"))
    for folder in reversed(built):
        if all((folder / tool).is_file() for tool in TOOLS):
            return with_driver(folder, root)
    source = unpacked_source(root / "src", log)
    version = source.name.removeprefix("llama_cpp_python-")
    build = root / "llama.cpp" / f"build-{version}"
    if shutil.which("cmake") is None:
        raise SystemExit("llama.cpp needs cmake: `apt-get install cmake` or `pip install cmake`")
    generator = ("-G", "Ninja") if shutil.which("ninja") else ()
    log(f"building llama.cpp {version} into {build} with {jobs} jobs (tens of minutes on 2 cores)")
    subprocess.run(["cmake", "-S", str(source / "vendor" / "llama.cpp"), "-B", str(build), *generator,
                    *CMAKE_FLAGS], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TOOLS], check=True)
    return with_driver(build / "bin", root)


def with_driver(bin_dir: Path, root: Path) -> Path:
    """`bin_dir`, with `cfm-llama-decode` compiled into it when missing or older than its source."""
    driver = bin_dir / DRIVER
    if driver.is_file() and driver.stat().st_mtime >= DRIVER_SOURCE.stat().st_mtime:
        return bin_dir
    version = bin_dir.parent.name.removeprefix("build-")
    source = root / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise SystemExit("compiling benchmarks/llamacpp_decode.cpp needs a C++ compiler (g++)")
    subprocess.run([compiler, "-O2", "-std=c++17", f"-I{source / 'include'}", f"-I{source / 'ggml' / 'include'}",
                    str(DRIVER_SOURCE), f"-L{bin_dir}", "-lllama", "-lggml", "-lggml-base",
                    f"-Wl,-rpath,{bin_dir.resolve()}", "-o", str(driver)], check=True)
    return bin_dir


def unpacked_source(folder: Path, log) -> Path:
    """The unpacked `llama-cpp-python` sdist under `folder` (downloaded with pip if absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    sdists = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        log("downloading the llama-cpp-python sdist (it vendors llama.cpp's source)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "llama-cpp-python", "-d", str(folder)], check=True)
        sdists = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    source = folder / sdists[-1].name.removesuffix(".tar.gz")
    if not (source / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        with tarfile.open(sdists[-1]) as archive:
            archive.extractall(folder, filter="data")
    return source


def decode(bin_dir: Path, gguf: Path, text: str, threads: int, new_tokens: int, rounds: int = 1) -> dict:
    """`cfm-llama-decode` on `text`: {"prompt_tokens", "threads", "rounds": [{"prefill_s",
    "decode_s", "tokens"}]}; `new_tokens` greedy decode steps per round, end of generation
    included (not stopped at)."""
    done = subprocess.run([str(bin_dir / DRIVER), "-m", str(gguf), "-t", str(threads), "-n", str(new_tokens),
                           "-r", str(rounds)], input=text, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def forced_logits(bin_dir: Path, gguf: Path, ids: list[int], threads: int = 1):
    """llama.cpp's logits after each token of `ids` (one batch): a float32 array of
    shape (len(ids), vocabulary)."""
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "logits.bin"
        done = subprocess.run([str(bin_dir / DRIVER), "-m", str(gguf), "-t", str(threads), "-l", str(path)],
                              input=" ".join(map(str, ids)), capture_output=True, text=True, check=True)
        shape = json.loads(done.stdout)
        return np.fromfile(path, dtype=np.float32).reshape(shape["tokens"], shape["vocab"])


def quantize(bin_dir: Path, source: Path, out: Path, kind: str, threads: int = 2) -> Path:
    """`out`: the GGUF file `source` quantized to `kind` (e.g. "Q8_0") by llama.cpp's own
    `llama-quantize`."""
    subprocess.run([str(bin_dir / "llama-quantize"), str(source), str(out), kind, str(threads)],
                   capture_output=True, text=True, check=True)
    return out


def build_info(bin_dir: Path) -> str:
    """The llama.cpp version the tools were built from (the sdist's name)."""
    match = re.search(r"build-([^/]+)", str(bin_dir))
    return f"llama.cpp vendored by llama-cpp-python {match.group(1)}" if match else str(bin_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    print(tools(args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
