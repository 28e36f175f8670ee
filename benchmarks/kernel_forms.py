"""Batch-1 decode of a packed `--target inductor` artifact with each form of cfmlang's native
kernel (`runtime/kernels/packed_linear.cpp`): the one built for this CPU, the AVX2 form (built
with `-mno-avx512f`) and the portable loop (`-mno-avx512f -mno-avx2`), as a CPU without those
instruction sets would run them. Each round runs `cfmc bench DIR --batch 1` once per form,
each in its own process (the ops of one form are registered per process); the medians over
`--rounds` rounds and their ratios to the native form are printed with the load averages.

    python benchmarks/kernel_forms.py DIR [--rounds 3] [--repeat 3]

DIR: an artifact compiled with `--target inductor` (default `--decode-kernel exact`), e.g.
`cfmc compile examples/smol.brick -o out/smol-inductor --target inductor`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMS = {"native": (), "avx2": ("-mno-avx512f",), "portable": ("-mno-avx512f", "-mno-avx2")}
ONE_RUN = """
import sys
from cfmlang.runtime import native
from cfmlang.cli import main
built = native.library_path
native.library_path = lambda extra=(): built(tuple(sys.argv[3:]) + tuple(extra))
sys.exit(main(["bench", sys.argv[1], "--batch", "1", "--repeat", sys.argv[2], "--format", "json"]))
"""


def decode_rate(directory: Path, flags: tuple[str, ...], repeat: int) -> float:
    """Batch-1 decode tokens/s of the artifact's program with the kernel built with `flags`."""
    done = subprocess.run([sys.executable, "-c", ONE_RUN, str(directory), str(repeat), *flags],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout)["results"][0]["decode"]["compiled_tokens_per_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {form: [] for form in FORMS}
    for _ in range(args.rounds):
        for form, flags in FORMS.items():
            rates[form].append(decode_rate(args.directory, flags, args.repeat))
    medians = {form: statistics.median(values) for form, values in rates.items()}
    for form, values in rates.items():
        print(f"{form:9s} decode {medians[form]:7.1f} tok/s (median of {values}), "
              f"{medians[form] / medians['native']:.2f}x native")
    print(f"load average before {[round(v, 2) for v in load_before]}, after {[round(v, 2) for v in os.getloadavg()]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
