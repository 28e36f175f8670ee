"""Weight readers used while executing: one tensor at a time, straight from disk.

Safetensors files are read with plain positioned reads into a fresh buffer (not mmap),
so the bytes of tensors already processed never stay in the process's resident set.
GGUF files are converted once to safetensors (through transformers) and cached by
content hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cfmlang.compiler.ir import TensorSpec
from cfmlang.io.sources import SourceError, safetensors_header

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_CODES = {v: k for k, v in TORCH_DTYPES.items()}
SUPPORT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                 "chat_template.jinja", "chat_template.json", "generation_config.json")


Rows = "tuple[int, int] | None"
"""A range [start, stop) of a tensor's first dimension, or None for the whole tensor."""


@dataclass
class NodeStats:
    """Tensors a node produced (each counted once, however many row blocks it took)."""

    tensors: int = 0
    last: str = ""

    def count(self, name: str) -> None:
        if name != self.last:
            self.tensors += 1
            self.last = name


class WeightError(Exception):
    """A problem found while reading or computing weights; names the tensor and file,
    and carries the span of the statement that produced it when one is known."""

    def __init__(self, message: str, span=None, help: str = ""):
        super().__init__(message)
        self.span = span
        self.help = help


class SafetensorsReader:
    def __init__(self, files: list[Path]):
        self.location: dict[str, tuple[Path, int, int]] = {}
        self.specs: list[TensorSpec] = []
        for path in files:
            header, data_start = safetensors_header(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self.location[name] = (path, data_start + start, end - start)
                self.specs.append(TensorSpec(name, tuple(info["shape"]), info["dtype"]))
        self.spec_by_name = {s.name: s for s in self.specs}

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        """The tensor, or only rows [start, stop) of its first dimension."""
        if name not in self.location:
            raise WeightError(f"tensor `{name}` is missing")
        path, offset, length = self.location[name]
        spec = self.spec_by_name[name]
        dtype = TORCH_DTYPES[spec.dtype]
        expected = dtype.itemsize
        for dim in spec.shape:
            expected *= dim
        if expected != length:
            raise WeightError(f"tensor `{name}` in {path.name} has {length} bytes but its "
                              f"shape {list(spec.shape)} and dtype {spec.dtype} need {expected}")
        shape = spec.shape
        if rows is not None:
            row_bytes = length // shape[0] if shape[0] else 0
            offset, length = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
            shape = (rows[1] - rows[0],) + shape[1:]
        buffer = torch.empty(length, dtype=torch.uint8)
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                got = handle.readinto(buffer.numpy())
        except OSError as exc:
            raise WeightError(f"cannot read tensor `{name}` from {path}: {exc.strerror or exc}") from None
        if got != length:
            raise WeightError(f"tensor `{name}` in {path.name} is truncated "
                              f"({got} of {length} bytes)")
        return buffer.view(dtype).reshape(shape)


class PickleReader:
    """`pytorch_model*.bin` checkpoints, read only when the model sets allow_pickle, and
    then only through torch's weights-only unpickler (tensors and plain containers: a
    pickle that names any other callable is refused, and nothing in it runs)."""

    def __init__(self, files: list[Path]):
        self.tensors: dict[str, torch.Tensor] = {}
        for path in files:
            self.tensors.update(load_pickled_state(path))
        self.specs = [TensorSpec(n, tuple(t.shape), DTYPE_CODES[t.dtype]) for n, t in self.tensors.items()]

    def get(self, name: str, rows: Rows = None) -> torch.Tensor:
        if name not in self.tensors:
            raise WeightError(f"tensor `{name}` is missing")
        tensor = self.tensors[name]
        return (tensor if rows is None else tensor[rows[0]:rows[1]]).clone()


def load_pickled_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch warns about pickle protocols it may not read
            state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch raises UnpicklingError, RuntimeError, EOFError...)
        raise SourceError("E145", f"{path.name} cannot be loaded safely: {_unpickling_reason(exc)}",
                          "only tensors are read from pickles; convert the checkpoint to "
                          "safetensors with a tool you trust") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) and v.dtype in DTYPE_CODES
            for k, v in state.items()):
        raise SourceError("E145", f"{path.name} does not hold a state dict of tensors",
                          "a pytorch_model.bin holds {name: tensor}; convert the checkpoint to safetensors")
    return state


TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _unpickling_reason(exc: Exception) -> str:
    """The line of torch's weights-only refusal that says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    telling = [line for line in lines if not line.startswith(TORCH_BOILERPLATE)]
    return telling[0] if telling else lines[0]


Identity = tuple[int, int, int, int, int]
"""(device, inode, size, mtime_ns, ctime_ns) of a file: a write, a replacement (`os.replace`,
a new inode) or `touch -r` (which cannot set the ctime) changes it."""
RACY_SECONDS = 2.0


def identity_of(stat: os.stat_result) -> Identity:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def file_identity(path: Path) -> Identity | None:
    try:
        return identity_of(path.stat())
    except OSError:
        return None


def hashed_file(path: Path, cache_dir: Path) -> tuple[str, Identity]:
    """Content hash of a file and the identity of the file it hashed. Hashes are
    remembered by (path, identity), so each version of a file is hashed once; a hash is
    not remembered while the file's last change is under RACY_SECONDS old (a second
    write within the file system's timestamp resolution could leave the same identity)."""
    memo_path = cache_dir / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError, RecursionError):
        memo = {}
    identity = identity_of(path.stat())
    key = f"{path.resolve()}|{'|'.join(map(str, identity))}"
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return memo[key], identity
    digest, identity = _hash_open_file(path)
    if time.time() - max(identity[3], identity[4]) / 1e9 > RACY_SECONDS:
        memo = memo if isinstance(memo, dict) else {}
        memo[f"{path.resolve()}|{'|'.join(map(str, identity))}"] = digest
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        os.replace(tmp, memo_path)
    return digest, identity


def _hash_open_file(path: Path) -> tuple[str, Identity]:
    """SHA-256 of the file opened at `path`, and its identity; hashed again if the file
    was written while it was read."""
    for _ in range(3):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            before = identity_of(os.fstat(handle.fileno()))
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
            if identity_of(os.fstat(handle.fileno())) == before:
                return digest.hexdigest(), before
    raise WeightError(f"{path} keeps changing while it is read", help="wait until whatever writes it is done")
