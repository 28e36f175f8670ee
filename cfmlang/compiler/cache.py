"""The build cache: one root directory (`CFM_CACHE_DIR`, default ~/.cache/cfmlang) holding

    nodes/KEY/    a node's output, the files of an artifact directory, + cfm-entry.json
    gguf/SHA256/  GGUF files converted to safetensors
    hashes.json   content hashes of input files, remembered by (path, size, mtime)

Entries are written in a temporary sibling and renamed into place, so a compile killed
at any point leaves a complete entry or none. Their files are made read-only and the
entry records each file's size and SHA-256 (a seal, `cfmlang.io.seal`), checked on every
use: an entry whose files changed in any byte is dropped, never used. An entry is stored
only if every input file the compile hashed for its keys still has the identity it had
then (device, inode, size, mtime, ctime): an input replaced or rewritten while it was
read fails the compile (E080) instead of being stored under the old key.

The cache is bounded (`CFM_CACHE_SIZE`, default 50G): after a compile the least
recently used entries are removed until it fits. Eviction and `clear` remove only what
the cache wrote: node entries (a folder with cfm-entry.json), sealed GGUF conversions,
and their own temporaries; anything else under the root is left alone. A category
folder (`nodes`, `gguf`) that is a symbolic link is shared with other caches and left
alone by eviction and clear.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cfmlang.artifact.write import atomic_directory
from cfmlang.cachedir import default_cache_dir
from cfmlang.diagnostics import CompileError, error
from cfmlang.io.gguf import SEAL_FILE
from cfmlang.io.seal import broken_seal, digest_of, pin, seal_of
from cfmlang.io.weights import Identity, WeightError, file_identity, hashed_file

ENTRY_FILE = "cfm-entry.json"
CATEGORIES = ("nodes", "gguf")
DEFAULT_LIMIT = "50G"
STALE_TEMPORARY_SECONDS = 24 * 3600
UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
MAX_LIMIT = 2**62
OWN_TEMPORARY = re.compile(r"^\.[0-9a-f]{64}\.(?:tmp|old|del)-[0-9]+-")
MARKERS = {"nodes": ENTRY_FILE, "gguf": SEAL_FILE}


@dataclass(frozen=True)
class Entry:
    """A complete node entry: its folder and its record (what wrote it, its files)."""

    path: Path
    record: dict

    @property
    def files(self) -> list[str]:
        return sorted(self.record["files"])


@dataclass(frozen=True)
class EntryInfo:
    """One entry as `cfmc cache ls` shows it."""

    category: str
    name: str
    path: Path
    bytes: int
    last_used: float
    what: str


class Cache:
    def __init__(self, root: Path | None = None, limit: int | None = None):
        self.root = Path(root) if root else default_cache_dir()
        self.limit = cache_limit() if limit is None else limit
        self.inputs: dict[Path, tuple[Identity, str]] = {}
        self.pins: list = []             # open entry files, share-locked while this cache is used

    def file_hash(self, path: Path) -> str:
        """The content hash of an input file; its identity is remembered so that
        `require_unchanged_inputs` can tell whether it changed since."""
        digest, identity = hashed_file(path, self.root)
        self.inputs.setdefault(Path(path), (identity, digest))
        return digest

    def require_unchanged_inputs(self) -> None:
        """WeightError (E080) naming an input file replaced or written since it was
        hashed: what was read from it may mix two versions, so it is neither stored nor
        written out."""
        for path, (identity, digest) in self.inputs.items():
            if not _same_file(path, identity, digest):
                raise WeightError(f"input {path} changed while this compile read it", help=(
                    "something replaced or rewrote it during the compile; nothing was stored or "
                    "written. Compile again once it is settled"))

    def node_path(self, key: str) -> Path:
        return self.root / "nodes" / key

    def lookup(self, key: str) -> Entry | None:
        """The complete, unchanged entry for `key`, or None (a damaged one is removed)."""
        path = self.node_path(key)
        try:
            handle = pin(path / ENTRY_FILE)
            record = json.loads(handle.read())
        except (OSError, ValueError, RecursionError):
            return None
        if not _intact(path, record):
            handle.close()
            _remove(path)
            return None
        self.pins.append(handle)
        return Entry(path, record)

    def store(self, key: str, write: Callable[[Path], dict]) -> Entry:
        """Write an entry atomically: `write(folder)` fills the folder and returns what to
        record about it; the files are then made read-only and their stats recorded."""
        with atomic_directory(self.node_path(key)) as tmp:
            record = write(tmp)
            for path in tmp.iterdir():
                path.chmod(0o444)
            record = {**record, "key": key, "files": seal_of(tmp)}
            (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            (tmp / ENTRY_FILE).chmod(0o444)
            self.pins.append(pin(tmp / ENTRY_FILE))     # the lock follows the file into place
            self.require_unchanged_inputs()
        return Entry(self.node_path(key), record)

    def entries(self) -> list[EntryInfo]:
        found = []
        for category in CATEGORIES:
            folder = self.root / category
            if not folder.is_dir() or folder.is_symlink():
                continue
            for path in sorted(folder.iterdir()):
                if _owned_entry(category, path):
                    found.append(EntryInfo(category, path.name, path, _folder_bytes(path),
                                           path.stat().st_mtime, _describe(category, path)))
        return found

    def clear(self) -> int:
        """Remove every entry, leftover temporaries and remembered hashes (nothing the
        cache did not write); bytes freed."""
        freed = 0
        for entry in self.entries():
            if _remove_unless_in_use(entry.path):
                freed += entry.bytes
        for path in self._own_temporaries():
            shutil.rmtree(path, ignore_errors=True)
        (self.root / "hashes.json").unlink(missing_ok=True)
        return freed

    def evict(self, keep: set[Path] = frozenset()) -> list[EntryInfo]:
        """Remove least recently used entries (never those in `keep`) until the cache fits
        its limit, and temporaries that interrupted compiles left over a day ago."""
        self._remove_stale_temporaries()
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        total = sum(e.bytes for e in entries)
        removed = []
        for entry in entries:
            if total <= self.limit:
                break
            if entry.path in keep or not _remove_unless_in_use(entry.path):
                continue
            total -= entry.bytes
            removed.append(entry)
        return removed

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        for path in self._own_temporaries():
            with contextlib.suppress(OSError):
                if now - path.lstat().st_mtime > STALE_TEMPORARY_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)

    def _own_temporaries(self) -> list[Path]:
        """Folders named like the temporaries this cache writes (`.KEY.tmp-PID-...`)."""
        found = []
        for category in CATEGORIES:
            folder = self.root / category
            if folder.is_dir() and not folder.is_symlink():
                found += [p for p in folder.iterdir() if OWN_TEMPORARY.match(p.name) and p.is_dir()
                          and not p.is_symlink()]
        return found


def touch(path: Path) -> None:
    """Mark an entry as just used (its folder's mtime orders the LRU eviction)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def link_entry(entry: Entry, folder: Path) -> None:
    """Put the entry's files into `folder`: hard links where the file system allows,
    copies elsewhere."""
    for name in entry.files:
        source = entry.path / name
        try:
            os.link(source, folder / name)
        except OSError:
            shutil.copyfile(source, folder / name)


def _remove_unless_in_use(path: Path) -> bool:
    """Remove an entry unless a compile holds it (a shared lock on its marker file);
    whether it was removed."""
    marker = next((path / name for name in MARKERS.values() if (path / name).is_file()), None)
    if marker is None:
        return False
    try:
        with open(marker, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _remove(path)
    except OSError:
        return False
    return True


def _same_file(path: Path, identity: Identity, digest: str) -> bool:
    """Whether `path` is still the file hashed as `digest` with `identity`. A change of
    the ctime alone (a link added or removed, as when the cache links or evicts an entry
    an input shares its inode with; a chmod) is settled by hashing the file again."""
    now = file_identity(path)
    if now is None or now[:4] != identity[:4]:
        return False
    return now[4] == identity[4] or digest_of(path) == digest


def _owned_entry(category: str, path: Path) -> bool:
    """Whether `path` is an entry this cache wrote: a real folder named by a key or
    hash, holding the category's marker file."""
    return (not path.name.startswith(".") and path.is_dir() and not path.is_symlink()
            and (path / MARKERS[category]).is_file())


def cache_limit() -> int:
    text = os.environ.get("CFM_CACHE_SIZE", DEFAULT_LIMIT)
    size = parse_size(text)
    if size is None:
        raise CompileError([error("E131", f"CFM_CACHE_SIZE={text!r} is not a size", None,
                                  "write a number of bytes with an optional unit: 500M, 50G, 1T")])
    return size


def parse_size(text: str) -> int | None:
    """`500M`, `50G`, `1.5T`, `1000` (bytes) -> bytes; None when not a size."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in UNITS else ""
    try:
        number = float(text[: len(text) - len(unit)])
    except ValueError:
        return None
    size = number * UNITS[unit]
    return int(size) if 0 <= size <= MAX_LIMIT else None


def _intact(path: Path, record) -> bool:
    """Whether the entry's files are exactly those sealed when it was stored."""
    if not isinstance(record, dict) or not isinstance(record.get("output"), dict):
        return False
    return broken_seal(path, record.get("files"), skip=(ENTRY_FILE,)) is None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _describe(category: str, path: Path) -> str:
    if category == "gguf":
        return "converted GGUF"
    try:
        record = json.loads((path / ENTRY_FILE).read_text())
    except (OSError, ValueError):
        return "incomplete"
    return f"{record.get('node', '?')}: {record.get('op', '?')} (from {record.get('file', '?')})"


def _remove(path: Path) -> None:
    """Rename away first (atomic), then delete: no reader ever sees half an entry."""
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.replace(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)
