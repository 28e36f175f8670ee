"""Seals: the size and SHA-256 of every file of a folder the cache wrote, recorded when
it is stored and checked each time it is used.

A seal is what lets the cache trust its own folders: a byte flipped in an entry (its
mtime kept or not), a truncated or deleted file, or a file added to the folder all break
it, and the folder is then dropped (or rebuilt) instead of served. Checking reads every
byte once: one SHA-256 pass over the folder's bytes on every use
(`benchmarks/seal_cost.py` prints its seconds per GB against a plain read of the same
bytes).
"""
from __future__ import annotations

import fcntl
import hashlib
from pathlib import Path

CHUNK = 8 * 1024**2


def digest_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def seal_of(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, list]:
    """{file name: [size, sha256]} of the files directly in `folder` (but `skip`)."""
    return {path.name: [path.stat().st_size, digest_of(path)]
            for path in sorted(folder.iterdir()) if path.name not in skip}


def broken_seal(folder: Path, seal, skip: tuple[str, ...] = ()) -> str | None:
    """Why `folder` does not match `seal` (a file named), or None when it does."""
    if not isinstance(seal, dict) or not seal:
        return "no seal"
    present = {path.name for path in folder.iterdir() if path.name not in skip} if folder.is_dir() else set()
    if present != set(seal):
        return f"files {sorted(present ^ set(seal))} added or removed"
    for name, recorded in seal.items():
        path = folder / name
        if not isinstance(recorded, list) or len(recorded) != 2 or not path.is_file() or path.is_symlink():
            return f"{name} is not the file sealed"
        if path.stat().st_size != recorded[0] or digest_of(path) != recorded[1]:
            return f"{name} changed since it was stored"
    return None


def pin(marker: Path):
    """The folder's marker file (cfm-entry.json, cfm-seal.json) opened with a shared lock:
    eviction and `cache clear`, in any process, leave the folder alone while the handle
    is open (they take an exclusive lock before removing)."""
    handle = open(marker, "rb")
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise
    return handle
