"""The per-file-version cache: an unchanged file is read once, a rewritten one again."""
from __future__ import annotations

import os

from cfmlang.io.filecache import per_file_version
from cfmlang.io.sources import safetensors_header_specs


def test_reads_once_per_version(tmp_path):
    reads = []

    @per_file_version(maxsize=4)
    def size_of(path):
        reads.append(path.name)
        return len(path.read_bytes())

    path = tmp_path / "a.txt"
    path.write_bytes(b"abc")
    assert size_of(path) == 3 and size_of(path) == 3
    assert reads == ["a.txt"]
    path.write_bytes(b"abcdef")
    os.utime(path, ns=(1, 1))
    assert size_of(path) == 6
    assert reads == ["a.txt", "a.txt"]


def test_safetensors_headers_follow_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2, 3)}, str(path))
    first = safetensors_header_specs(path)
    assert [(t.name, t.shape, t.dtype) for t in first] == [("x", (2, 3), "F32")]
    assert safetensors_header_specs(path) is first          # kept, not re-read
    save_file({"x": torch.zeros(4, 3, dtype=torch.float16)}, str(path))
    assert [(t.shape, t.dtype) for t in safetensors_header_specs(path)] == [((4, 3), "F16")]
