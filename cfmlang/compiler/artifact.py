"""Artifacts: atomic output directories and streamed, sharded safetensors writing.

Shapes and dtypes of every output tensor are known before any is computed, so each
shard's header is written first and tensors are streamed into place one at a time:
memory stays near the largest tensor, not the model size.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch

from cfmlang.compiler.ir import FLOAT_DTYPES, TensorSpec
from cfmlang.compiler.weights import DTYPE_CODES, SUPPORT_FILES, TORCH_DTYPES, Rows, WeightError

DEFAULT_SHARD_BYTES = 5 * 1024**3
DEFAULT_CHUNK_BYTES = 16 * 1024**2
Produce = Callable[[str, "tuple[int, int] | None"], torch.Tensor]
INDEX_NAME = "model.safetensors.index.json"


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target` whole.

    On any exception (including KeyboardInterrupt) the temporary directory is removed
    and an existing `target` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.is_symlink():
            target.unlink()
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def nbytes(spec: TensorSpec) -> int:
    size = TORCH_DTYPES[spec.dtype].itemsize
    for dim in spec.shape:
        size *= dim
    return size


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        size = nbytes(spec)
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        size = nbytes(spec)
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def row_chunks(spec: TensorSpec, chunk_bytes: int) -> list[tuple[int, int] | None]:
    """Row ranges of at most `chunk_bytes` each ([None] for a 0-d tensor)."""
    if not spec.shape:
        return [None]
    rows = spec.shape[0]
    row_bytes = max(nbytes(spec) // rows, 1) if rows else 1
    step = max(1, chunk_bytes // row_bytes)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] or [(0, 0)]


def write_shard(path: Path, specs: list[TensorSpec], produce: Produce,
                on_tensor: Callable[[TensorSpec], None] = lambda spec: None,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Write one safetensors file: header first, then each tensor, a block of rows at a
    time, as it is produced. The next block is read and computed on a producer thread
    while this one is written, so disk writes overlap reads and math."""
    jobs = [(spec, rows) for spec in specs for rows in row_chunks(spec, chunk_bytes)]
    with open(path, "wb") as handle, contextlib.closing(prefetched(jobs, produce)) as blocks:
        handle.write(_header_bytes(specs, {"format": "pt"}))
        for spec, rows, block in blocks:
            _check_block(spec, rows, block)
            handle.write(block.contiguous().view(-1).view(torch.uint8).numpy().data)
            if rows is None or rows[1] == spec.shape[0]:
                on_tensor(spec)


def prefetched(jobs: list[tuple[TensorSpec, Rows]], produce: Produce,
               ahead: int = 1) -> Iterator[tuple[TensorSpec, Rows, torch.Tensor]]:
    """Blocks of `jobs` in order, each produced on one worker thread up to `ahead` blocks
    before the caller asks for it. One worker keeps producers single-threaded (they
    cache whole tensors between calls); torch spreads each op over the cores itself."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfm-produce")
    pending: deque = deque()
    try:
        for spec, rows in jobs:
            pending.append((spec, rows, pool.submit(produce, spec.name, rows)))
            if len(pending) > ahead:
                spec_done, rows_done, future = pending.popleft()
                yield spec_done, rows_done, future.result()
        while pending:
            spec_done, rows_done, future = pending.popleft()
            yield spec_done, rows_done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_block(spec: TensorSpec, rows, block: torch.Tensor) -> None:
    shape = spec.shape if rows is None else (rows[1] - rows[0],) + spec.shape[1:]
    if tuple(block.shape) != shape or DTYPE_CODES.get(block.dtype) != spec.dtype:
        raise WeightError(f"tensor `{spec.name}` came out as {list(block.shape)} "
                          f"{DTYPE_CODES.get(block.dtype)}, expected {list(shape)} {spec.dtype}")


def write_sharded(folder: Path, specs: list[TensorSpec], produce: Produce,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  on_tensor: Callable[[TensorSpec], None] = lambda spec: None,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[str]:
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    for name, shard in zip(names, shards):
        write_shard(folder / name, shard, produce, on_tensor, chunk_bytes)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes(s) for s in specs)},
                 "weight_map": {s.name: n for n, shard in zip(names, shards) for s in shard}}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def held_specs(state: dict[str, torch.Tensor]) -> list[TensorSpec]:
    """Specs of tensors already in memory."""
    return [TensorSpec(n, tuple(t.shape), DTYPE_CODES[t.dtype]) for n, t in state.items()]


def held_producer(state: dict[str, torch.Tensor]) -> Produce:
    """Serve blocks of rows of tensors already in memory."""
    return lambda name, rows: state[name] if rows is None else state[name][rows[0]:rows[1]]


def write_state_dict(folder: Path, state: dict[str, torch.Tensor]) -> list[str]:
    return write_sharded(folder, held_specs(state), held_producer(state))


TORCH_DTYPE_NAMES = {code: name for name, code in FLOAT_DTYPES.items()}


def copy_support_files(source_dir: Path, folder: Path, dtype_code: str | None) -> None:
    """config.json (with the output dtype), tokenizer and generation config from the base."""
    config = json.loads((source_dir / "config.json").read_text())
    if dtype_code in TORCH_DTYPE_NAMES:
        config["dtype"] = TORCH_DTYPE_NAMES[dtype_code]
        config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in SUPPORT_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, folder / name)


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "cfm.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> list[str]:
    """A PEFT adapter directory: adapter_model.safetensors + adapter_config.json."""
    write_shard(folder / "adapter_model.safetensors", held_specs(tensors), held_producer(tensors))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ["adapter_model.safetensors"]
