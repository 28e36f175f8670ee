"""Content keys of graph nodes: a hash of everything that decides a node's output.

A node's key hashes
- its kind (the IR class) and every field of its IR dataclass, walked generically
  (spans excepted: moving a statement or editing a comment changes no weight), so a
  new node kind needs nothing to be cached correctly;
- the program-wide settings that reach every node (seed, dtype ...);
- the keys of the nodes it reads;
- for every source it names, the content hashes of the files read from it, and for every
  string that is the absolute path of a file (a calibration text ...), that file's
  content hash (computed once per file and remembered by size and mtime), and for one
  of a directory (probe prompts ...), the hashes of every file in it;
- the compiler itself: the cfmlang package's own files (code and shipped data) and the
  torch version, so a key never outlives the code that computed its value.

A value the walk does not know makes the node uncacheable (key None): it and its
dependants then always run, which is slow but never wrong.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import networkx as nx
from pydantic import BaseModel

from cfmlang.compiler.graph import execution_order
from cfmlang.compiler.ir import CheckedProgram, Source
from cfmlang.io.sources import SAFETENSORS_INDEX, weight_files
from cfmlang.io.weights import SUPPORT_FILES
from cfmlang.diagnostics import Span

CACHE_FORMAT = 1
PROGRAM_FIELDS_NOT_IN_KEYS = frozenset({"root", "nodes", "output", "files", "warnings"})
"""CheckedProgram fields that are not settings of the nodes; every other field (seed,
dtype, and any setting added later) is part of every node's key."""
SUPPORT_NAMES = ("config.json",) + SUPPORT_FILES

FileHash = Callable[[Path], str]


class Uncacheable(Exception):
    """A node holds a value the key walk cannot hash deterministically."""


def node_keys(program: CheckedProgram, graph: nx.DiGraph, file_hash: FileHash) -> dict[str, str | None]:
    """The key of every node of `graph` (None for uncacheable nodes and their dependants)."""
    settings = {f.name: canonical(getattr(program, f.name), file_hash)
                for f in dataclasses.fields(program) if f.name not in PROGRAM_FIELDS_NOT_IN_KEYS}
    keys: dict[str, str | None] = {}
    for name in execution_order(graph):
        node = program.node(name)
        inputs = {dep: keys[dep] for dep in node.deps}
        try:
            walked = canonical(node, file_hash)
        except Uncacheable:
            walked = None
        if walked is None or None in inputs.values():
            keys[name] = None
            continue
        keys[name] = digest({"format": CACHE_FORMAT, "compiler": compiler_fingerprint(),
                             "settings": settings, "node": walked, "inputs": inputs})
    return keys


def digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def canonical(value: Any, file_hash: FileHash) -> Any:
    """A JSON-able, deterministic image of an IR value. Maps keep their order (the first
    matching filter wins, so order is meaning); sources become their files' hashes."""
    if isinstance(value, Source):
        return {"source": source_contents(value, file_hash)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__,
                "fields": {f.name: canonical(getattr(value, f.name), file_hash)
                           for f in dataclasses.fields(value)
                           if not isinstance(getattr(value, f.name), Span)}}
    if isinstance(value, BaseModel):
        return {"type": type(value).__name__, "fields": canonical(value.model_dump(), file_hash)}
    if isinstance(value, dict):
        return {"map": [[canonical(k, file_hash), canonical(v, file_hash)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [canonical(v, file_hash) for v in value]
    if isinstance(value, Enum):
        return canonical(value.value, file_hash)
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, str) and value.startswith("/") and os.path.isfile(value):
        return {"file": value, "sha256": file_hash(Path(value))}
    if isinstance(value, str) and value.startswith("/") and os.path.isdir(value):
        files = sorted(p for p in Path(value).rglob("*") if p.is_file())
        return {"directory": value, "files": [[str(p.relative_to(value)), file_hash(p)] for p in files]}
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise Uncacheable(f"cannot hash a {type(value).__name__}")


def source_contents(source: Source, file_hash: FileHash) -> dict:
    """Where a source is and what its files hold: [relative name, sha256] of each file
    the compiler reads from it (weights, config, tokenizer)."""
    path = Path(source.path)
    files = source_files(source)
    root = path if path.is_dir() else path.parent
    return {"tag": source.tag, "kind": source.kind, "path": str(path),
            "files": [[str(f.relative_to(root)), file_hash(f)] for f in files]}


def source_files(source: Source) -> list[Path]:
    path = Path(source.path)
    if source.kind == "gguf":
        return [path]
    if source.kind == "safetensors":
        return [path] + _support_files(path.parent)
    if source.kind == "hf":
        index = [path / SAFETENSORS_INDEX] if (path / SAFETENSORS_INDEX).is_file() else []
        return weight_files(path, allow_pickle=True) + index + _support_files(path)
    # any other kind (added later): every regular file it holds
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def _support_files(folder: Path) -> list[Path]:
    return [folder / n for n in SUPPORT_NAMES if (folder / n).is_file()]


@functools.cache
def compiler_fingerprint() -> str:
    """The cfmlang package's own files (code, grammar, shipped data) and the torch version,
    hashed."""
    import torch

    package = Path(__file__).resolve().parents[1]
    sha = hashlib.sha256(f"torch {torch.__version__}".encode())
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            sha.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()
