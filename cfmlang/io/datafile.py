"""Data files a program names (facts, training and fine-tuning data, calibration text,
probe sets, evaluation tasks), read whole, safely: only regular files (a FIFO would block
the compile, `/dev/zero` would fill the memory), never more than MAX_DATA_BYTES.

The file is opened without blocking and checked on the open descriptor, so a path
swapped for a pipe between a check and the read cannot hang the reader."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

MAX_DATA_BYTES = 1 << 30
"""The largest data file read (1 GiB): data files are read whole into memory."""
CHUNK_BYTES = 1 << 24


class DataFileError(OSError):
    """A data file that is not a regular file, or larger than the limit; its text says
    which and what to do."""

    def __init__(self, message: str):
        super().__init__(errno.EINVAL, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def read_data_bytes(path: Path, limit: int = MAX_DATA_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Raises DataFileError for a
    FIFO, socket, device or directory and for a larger file, and the OSError of the open
    (FileNotFoundError ...) otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb", buffering=0) as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataFileError(f"`{Path(path).name}` is {_kind(info.st_mode)}, not a regular file; "
                                "a data file is read whole, so it must be a plain file")
        if info.st_size > limit:
            raise DataFileError(_too_large(path, info.st_size, limit))
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= limit:                  # the file may have grown since fstat
            data = handle.read(min(limit + 1 - total, CHUNK_BYTES))
            if not data:
                break
            chunks.append(data)
            total += len(data)
    if total > limit:
        raise DataFileError(_too_large(path, total, limit))
    return b"".join(chunks)


def read_data_text(path: Path, limit: int = MAX_DATA_BYTES, errors: str = "strict") -> str:
    """The UTF-8 text of a data file (see read_data_bytes); UnicodeDecodeError when it is
    not UTF-8 and `errors` is strict."""
    return read_data_bytes(path, limit).decode("utf-8", errors)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


def _too_large(path: Path, size: int, limit: int) -> str:
    return (f"`{Path(path).name}` holds {size / 2**20:.0f} MiB or more; data files are read whole and may hold "
            f"at most {limit / 2**20:.0f} MiB (use a sample of it)")
