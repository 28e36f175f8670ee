"""What checking a cache entry's seal costs: one SHA-256 pass over its bytes
(`cfmlang.io.seal`), against a plain read of the same file measured in the same run.

    .venv/bin/python benchmarks/seal_cost.py [--megabytes 512] [--repeat 3]

Prints seconds per GB for both (the median of the repeats, the file in the page cache as
it is right after a compile) and their ratio; the ratio is the number to quote, since
absolute speed depends on the machine and its load."""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from cfmlang.io.seal import CHUNK, digest_of


def plain_read(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(CHUNK):
            pass


def seconds(action, path: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action(path)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "entry.safetensors"
        path.write_bytes(os.urandom(args.megabytes * 1024**2))
        plain_read(path)                                     # into the page cache
        gigabytes = args.megabytes / 1024
        read = seconds(plain_read, path, args.repeat) / gigabytes
        sealed = seconds(digest_of, path, args.repeat) / gigabytes
    print(f"plain read:   {read:.3f} s/GB")
    print(f"seal check:   {sealed:.3f} s/GB")
    print(f"ratio:        {sealed / read:.1f}x a plain read")


if __name__ == "__main__":
    main()
