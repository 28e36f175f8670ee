"""Artifacts: atomic output directories and streamed, sharded safetensors writing.

Shapes and dtypes of every output tensor are known before any is computed, so each
shard's header is written first and tensors are streamed into place one at a time:
memory stays near the largest tensor, not the model size.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from cfmlang.compiler.ir import FLOAT_DTYPES, TensorSpec
from cfmlang.io.weights import DTYPE_CODES, SUPPORT_FILES, TORCH_DTYPES, Rows, WeightError

DEFAULT_SHARD_BYTES = 5 * 1024**3
DEFAULT_CHUNK_BYTES = 16 * 1024**2
Produce = Callable[[str, "tuple[int, int] | None"], torch.Tensor]
INDEX_NAME = "model.safetensors.index.json"


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target` whole.

    On any exception (including KeyboardInterrupt) the temporary directory is removed
    and an existing `target` is left untouched. The replacement is one atomic exchange
    of the two directories (Linux renameat2), so a process killed at any instant leaves
    either the old `target` or the new one, never neither; siblings left behind by
    killed processes are removed by the next write to the same target. When two writers
    finish at once, the later one replaces the earlier one's directory (`move_into_place`).
    """
    target = Path(target)
    if target.is_symlink():
        raise FileExistsError(errno.EEXIST, "a symbolic link is never replaced or followed", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(target, "tmp"), dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        _fsync_tree(tmp)
        with _sigint_deferred() as interrupt:
            move_into_place(tmp, target)
            _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if interrupt.pending:
        raise InterruptedAfterWrite(target)


def move_into_place(tmp: Path, target: Path) -> None:
    """Put the finished directory `tmp` at `target`, replacing what is there. A rename is
    tried first (no target, or an empty one); a non-empty target, whether it was there
    before or another writer just created it, is exchanged atomically. No `exists()`
    check comes first, so there is no window for a concurrent writer to fall into."""
    try:
        os.replace(tmp, target)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or target.is_symlink():
            raise
    _replace_directory(tmp, target)


class InterruptedAfterWrite(KeyboardInterrupt):
    """Ctrl-C arrived while a finished directory was being moved into place: the move
    completed first, so `target` holds the complete new contents."""

    def __init__(self, target: Path):
        super().__init__(str(target))
        self.target = target


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C (under `terminations_raised`) so that a
    killed compile removes its temporaries on the way out."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.number = number


TERMINATIONS = (signal.SIGTERM, signal.SIGHUP)


def _raise_terminated(number, frame):
    raise Terminated(number)


@contextlib.contextmanager
def terminations_raised() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP (where no one else handles them) raise
    `Terminated` in the main thread instead of killing the process outright."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in TERMINATIONS}
    for number, handler in previous.items():
        if handler is signal.SIG_DFL:
            signal.signal(number, _raise_terminated)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@dataclass
class _Interrupt:
    pending: bool = False


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[_Interrupt]:
    """Hold back SIGINT (and SIGTERM/SIGHUP raised as `Terminated`) while the block runs
    (main thread with Python's default handlers only); `.pending` says whether one arrived."""
    interrupt = _Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return
    held = {number: handler for number in (signal.SIGINT, *TERMINATIONS)
            if (handler := signal.getsignal(number)) in (signal.default_int_handler, _raise_terminated)}
    for number in held:
        signal.signal(number, lambda number, frame: setattr(interrupt, "pending", True))
    try:
        yield interrupt
    finally:
        for number, handler in held.items():
            signal.signal(number, handler)


def _sibling_prefix(target: Path, role: str) -> str:
    return f".{target.name}.{role}-{os.getpid()}-"


def remove_stale_siblings(target: Path) -> None:
    """Remove temporary siblings of `target` whose writing process no longer exists."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)-")
    for sibling in target.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and not _process_alive(int(match.group(1))) and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _replace_directory(new: Path, target: Path) -> None:
    """Put `new` at `target` and delete the old `target`, atomically where possible."""
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)   # `new` now holds the previous artifact
        return
    old = Path(tempfile.mkdtemp(prefix=_sibling_prefix(target, "old"), dir=target.parent))
    os.replace(target, old / "previous")
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with renameat2(RENAME_EXCHANGE); False where the
    platform or file system has no such call."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _fsync_dir(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


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
    if block.is_floating_point() and block.numel() and not _finite(block):
        raise WeightError(f"tensor `{spec.name}` holds NaN or infinite values; nothing was written",
                          help="an input (a model or an adapter: its weights or its lora_alpha) is "
                          "damaged, or the operation is numerically unstable")


def _finite(block: torch.Tensor) -> bool:
    """No NaN nor infinity in `block` (min/max propagate NaN; no block-sized mask)."""
    low, high = torch.aminmax(block)
    return bool(torch.isfinite(low) and torch.isfinite(high))


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


def copy_support_files(source_dir: Path, folder: Path, dtype_code: str | None, config: dict) -> None:
    """config.json (`config`, with the output dtype), tokenizer and generation config
    from `source_dir`."""
    config = dict(config)
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
