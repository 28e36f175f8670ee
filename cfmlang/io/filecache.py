"""Results computed from a file, remembered per version of the file.

A version is (resolved path, size, mtime_ns): a rewritten file is read again, an
unchanged one costs a stat. The language server re-checks a program on every keystroke;
this keeps the safetensors headers and configs it needs from being re-read each time.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def file_version(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def per_file_version(maxsize: int) -> Callable[[Callable[[Path], T]], Callable[[Path], T]]:
    """Decorates `read(path)` so that its result is kept per file version. Failures are
    not kept. The result must be immutable (it is shared by every caller)."""
    def decorate(read: Callable[[Path], T]) -> Callable[[Path], T]:
        @functools.lru_cache(maxsize=maxsize)
        def by_version(path_name: str, size: int, mtime_ns: int) -> T:
            return read(Path(path_name))

        @functools.wraps(read)
        def cached(path: Path) -> T:
            return by_version(*file_version(Path(path)))
        cached.cache_clear = by_version.cache_clear
        cached.cache_info = by_version.cache_info
        return cached
    return decorate
