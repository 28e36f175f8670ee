"""Opening an artifact's lowered programs without running code that came with it.

An artifact may come from anyone, so nothing in it is executed unless the user said so:

- `export` programs (`torch.export.save` archives) are read into memory once, and that
  copy is inspected before `torch.export.load` sees it: `torch.export.load` unpickles a
  weight or constant marked `use_pickle`, an opaque constant, a legacy `.pt` weights
  file, and sample inputs that the restricted unpickler refuses, and any of those can
  run code. An archive holding one of them, or AOTInductor code, is refused (E210). The
  bytes loaded are the bytes inspected: a file swapped after the check is not read.
- `inductor` and `tensorrt` programs are native code by nature (a shared library, or a
  TensorRT engine loaded through pickle). They are loaded only when their SHA-256 is in
  this user's trust list, which `cfmc compile` fills for the programs it builds, or when
  the caller passes `trust_code=True` (`cfmc run --trust-code`); otherwise E211. The
  program is first copied to a private temporary file while it is hashed, and the copy
  is what gets loaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from cfmlang.cachedir import default_cache_dir
from cfmlang.diagnostics import CompileError, error
from cfmlang.io.seal import digest_of

NATIVE_TARGETS = ("inductor", "tensorrt")
TRUSTED_DIR = "trusted-programs"
CHUNK = 16 * 1024**2
# payload config file suffix -> the prefix of the plain (unpickled) tensor files it may name
PAYLOAD_CONFIGS = {"_weights_config.json": "weight_", "_constants_config.json": "tensor_"}


# ---------------------------------------------------------------- export archives

def open_export_program(path: Path) -> io.BytesIO:
    """The bytes of the `torch.export` archive at `path`, checked to hold no pickled
    payload and no native code; E210 naming the part otherwise."""
    data = io.BytesIO(path.read_bytes())
    try:
        with zipfile.ZipFile(data) as archive:
            names = archive.namelist()
            inside = [_inside_root(name) for name in names]
            if len(set(inside)) != len(names) or len({name.split("/", 1)[0] for name in names}) != 1:
                raise refused(path, "names an archive member twice or under two root folders (what "
                                    "torch would load could differ from what was checked)")
            for name, part in zip(names, inside):
                problem = _unsafe_part(part, lambda: archive.read(name))
                if problem:
                    raise refused(path, f"holds {problem} (`{part}`), which loading would run as code")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise refused(path, f"is not a torch.export archive ({exc})") from None
    data.seek(0)
    return data


def refused(path: Path, what: str) -> CompileError:
    return CompileError([error("E210", f"lowered program {path} {what}", None,
                               "recompile the artifact from its .brick file, or load it with "
                               "target=\"eager\" (`cfmc run --target eager`)")])


def _inside_root(name: str) -> str:
    """An archive member's name without the archive's root folder."""
    return name.split("/", 1)[1] if "/" in name else name


def _unsafe_part(name: str, read) -> str | None:
    """What makes the archive member `name` unsafe to load, or None; `read()` gives its
    bytes (read only for the members whose content decides)."""
    if name.startswith("data/aotinductor/"):
        return "AOTInductor native code"
    if name.startswith(("data/weights/", "data/constants/")) and name.endswith(".pt"):
        return "a pickled legacy state dict"
    for suffix, prefix in PAYLOAD_CONFIGS.items():
        if name.endswith(suffix):
            return _unsafe_payload_config(read(), prefix)
    if name.startswith("data/sample_inputs/"):
        return _unsafe_sample_inputs(read())
    return None


def _unsafe_payload_config(content: bytes, plain_prefix: str) -> str | None:
    try:
        entries = json.loads(content)["config"]
        items = list(entries.items())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return "an unreadable payload config"
    for fqn, meta in items:
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            return f"a pickled payload for `{fqn}`"
        if not str(meta.get("path_name", "")).startswith(plain_prefix):
            return f"a payload `{fqn}` that is not a plain tensor"
    return None


def _unsafe_sample_inputs(content: bytes) -> str | None:
    """Sample inputs that `torch.load(weights_only=True)` refuses (torch.export.load
    would then retry them with the unrestricted unpickler)."""
    import torch

    if not content:
        return None
    try:
        torch.load(io.BytesIO(content), weights_only=True)
    except Exception:  # noqa: BLE001 - whatever the restricted unpickler refuses is refused
        return "sample inputs that are not plain tensors"
    return None


# ---------------------------------------------------------------- native programs

def trust_list(root: Path | None = None) -> Path:
    return (root or default_cache_dir()) / TRUSTED_DIR


def record_trusted(path: Path, root: Path | None = None) -> str:
    """Add the program at `path` (one this process built) to the trust list."""
    digest = digest_of(path)
    folder = trust_list(root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / digest).touch()
    return digest


@contextlib.contextmanager
def native_program(path: Path, trust_code: bool, root: Path | None = None) -> Iterator[Path]:
    """A private copy of the native program at `path` to load, when it is trusted;
    E211 otherwise. The copy is removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="cfm-program-") as private:
        copy = Path(private) / path.name
        digest = _copy_hashing(path, copy)
        if not trust_code and not (trust_list(root) / digest).is_file():
            raise CompileError([error(
                "E211", f"lowered program {path} is native code that this machine did not build "
                f"(sha256 {digest[:16]}...)", None,
                "run it only if you trust who built it: `cfmc run --trust-code` or "
                "cfmlang.load(DIR, trust_code=True); or load it with target=\"eager\"")])
        yield copy


def _copy_hashing(source: Path, copy: Path) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(copy, "xb") as writer:
        os.chmod(copy, 0o600)
        while block := reader.read(CHUNK):
            digest.update(block)
            writer.write(block)
    return digest.hexdigest()

