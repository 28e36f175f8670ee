"""Reading an artifact's manifest (cfm.json) and the files transformers reads from it
(config.json, the tokenizer) as untrusted input.

Every value used to load an artifact is checked before use: the manifest is a JSON
object, its `lowered` entry names a known target and dtype, and every file it names is
a relative path that stays inside the artifact (no absolute path, no `..`, no link out
of it) and is a regular file. A manifest that breaks a rule is E212 (a path that leaves
the artifact) or E213 (anything else malformed), naming the file and the key. A missing
or malformed tokenizer is E218, a config.json that is malformed or that transformers
refuses is E219.
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cfmlang.diagnostics import CompileError, Span, error

MANIFEST = "cfm.json"
LOWERED_TARGETS = ("export", "inductor", "tensorrt")
FILE_TARGETS = ("gguf",)
"""Lowered files for other runtimes (llama.cpp, Ollama): cfmlang runs such an artifact's
eager weights."""
PROGRAM_DTYPES = ("float32", "float16", "bfloat16")
PROGRAM_NAMES = ("program", "prefill", "decode")
CACHES = ("in_place", "functional")
DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:[0-9]{1,3})?")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
RECOMPILE = "recompile the artifact from its .brick file (`cfmc compile FILE -o DIR`)"


@dataclass(frozen=True)
class LoweredEntry:
    """The manifest's `lowered` entry, checked: `files` maps a program's role to its
    confined path; `static` (tensorrt) the static shapes; `raw` the entry as written."""

    target: str
    dtype: str
    device: str
    files: dict[str, Path]
    max_length: int | None
    static: dict | None
    decode_max_batch: int | None
    in_place_cache: bool
    raw: dict


def read_manifest(directory: Path) -> dict:
    """The artifact's cfm.json as a dict; E090 when there is none, E213 when it is not a
    JSON object."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CompileError([error("E090", f"{directory} is not a cfmlang artifact (no cfm.json)",
                                  None, "compile one with `cfmc compile FILE -o DIR`")])
    return json_object(path, "E213")


def json_object(path: Path, code: str) -> dict:
    """The JSON object in the artifact file `path`; `code` when the file is missing, is
    not valid JSON (at its line and column), or holds something else."""
    if not path.is_file():
        raise malformed(path, "is missing", code)
    try:
        value = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise CompileError([error(code, f"{path} is not valid JSON: {exc.msg}",
                                  Span.point(str(path), exc.lineno, exc.colno), RECOMPILE)]) from None
    except (UnicodeDecodeError, RecursionError, ValueError, OSError) as exc:
        raise malformed(path, f"cannot be read as JSON ({type(exc).__name__})", code) from None
    if not isinstance(value, dict):
        raise malformed(path, "does not hold a JSON object", code)
    return value


def model_config(directory: Path) -> dict:
    """The artifact's config.json, checked to be a JSON object before transformers reads it (E219)."""
    return json_object(Path(directory) / "config.json", "E219")


def tokenizer_files(directory: Path) -> tuple[Path, ...]:
    """The tokenizer files of an artifact, those in JSON checked to hold an object (E218);
    E218 when it has none (its model source had no tokenizer)."""
    found = tuple(Path(directory) / name for name in TOKENIZER_FILES if (Path(directory) / name).is_file())
    if not found:
        raise CompileError([error("E218", f"{directory} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})",
                                  None, "the model it was compiled from had none beside its config.json: save its "
                                  "tokenizer there (`tokenizer.save_pretrained(FOLDER)`) and compile again; "
                                  "`cfmlang.load(DIR)` gives the model without a tokenizer")])
    for path in found:
        if path.suffix == ".json":
            json_object(path, "E218")
    return found


@contextlib.contextmanager
def refused_by_transformers(subject, code: str):
    """Turns transformers' refusal of `subject` (an artifact file, or words naming what it
    reads) into `code`.
    transformers answers a bad value with any exception type (KeyError, TypeError, its own
    validation errors ...); system failures (memory, an OS error with an errno) pass through."""
    try:
        yield
    except (CompileError, MemoryError):
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise malformed(subject, f"cannot be loaded: {_reason(exc)}", code) from None
    except Exception as exc:
        raise malformed(subject, f"cannot be loaded: {type(exc).__name__}: {_reason(exc)}", code) from None


def _reason(exc: BaseException) -> str:
    """The exception's message on one line, cut at 240 characters."""
    words = " ".join(str(exc).split())
    return words[:240] + ("..." if len(words) > 240 else "") if words else type(exc).__name__


def malformed(path, what: str, code: str = "E213") -> CompileError:
    return CompileError([error(code, f"{path} {what}", None, RECOMPILE)])


def lowered_entry(directory: Path, manifest: dict) -> LoweredEntry | None:
    """The checked `lowered` entry of the manifest; None when the artifact has none that
    cfmlang runs (none, or a file for other runtimes such as gguf)."""
    raw = manifest.get("lowered")
    if raw is None:
        return None
    path = Path(directory) / MANIFEST
    if not isinstance(raw, dict):
        raise malformed(path, "has a `lowered` entry that is not an object")
    if raw.get("target") in FILE_TARGETS:
        return None
    target = _choice(path, raw, "target", LOWERED_TARGETS)
    files = raw.get("files")
    if not isinstance(files, dict) or not files or not set(files) <= set(PROGRAM_NAMES):
        raise malformed(path, f"has `lowered.files` that is not an object naming some of "
                              f"{', '.join(PROGRAM_NAMES)}")
    return LoweredEntry(target=target, dtype=_choice(path, raw, "dtype", PROGRAM_DTYPES),
                        device=_device(path, raw),
                        files={role: confined(directory, name, f"lowered.files.{role}")
                               for role, name in files.items()},
                        max_length=_count(path, raw, "max_length"), static=_static(path, raw, target),
                        decode_max_batch=_count(path, _object(path, raw, "packing"), "decode_max_batch",
                                                "lowered.packing"),
                        in_place_cache=_choice(path, {"cache": "functional", **raw}, "cache", CACHES) == "in_place",
                        raw=raw)


def confined(directory: Path, name, key: str) -> Path:
    """`directory/name` when `name` is a relative path to a regular file inside the
    directory, links resolved; E212 naming `key` otherwise."""
    path = Path(directory) / MANIFEST
    if not isinstance(name, str) or not name or "\x00" in name:
        raise malformed(path, f"has `{key}` that is not a file name")
    parts = PurePosixPath(name)
    if parts.is_absolute() or ".." in parts.parts or "\\" in name:
        raise _escapes(path, key, name)
    root = Path(directory).resolve()
    target = (root / parts).resolve()
    if root not in target.parents:
        raise _escapes(path, key, name)
    if not target.is_file():
        raise malformed(path, f"names `{name}` in `{key}`, which is not a file in the artifact")
    return target


def _escapes(path: Path, key: str, name: str) -> CompileError:
    return CompileError([error("E212", f"{path} names `{name}` in `{key}`, a path outside the artifact",
                               None, "an artifact's files are relative paths inside its directory; "
                               + RECOMPILE)])


def _choice(path: Path, raw: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = raw.get(key)
    if value not in allowed or not isinstance(value, str):
        raise malformed(path, f"has `lowered.{key}` {json.dumps(value)[:40]}, not one of {', '.join(allowed)}")
    return value


def _device(path: Path, raw: dict) -> str:
    value = raw.get("device", "cpu")
    if not isinstance(value, str) or not DEVICE.fullmatch(value):
        raise malformed(path, f"has `lowered.device` {json.dumps(value)[:40]}, not a device such as cpu or cuda:0")
    return value


def _count(path: Path, raw: dict, key: str, where: str = "lowered") -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if type(value) is not int or not 0 < value < 2**31:
        raise malformed(path, f"has `{where}.{key}` {json.dumps(value)[:40]}, not a positive whole number")
    return value


def _object(path: Path, raw: dict, key: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise malformed(path, f"has `lowered.{key}` that is not an object")
    return value


def _static(path: Path, raw: dict, target: str) -> dict | None:
    """The static shapes of a tensorrt program (required for it, ignored otherwise)."""
    if target != "tensorrt":
        return None
    static = {key: _count(path, _object(path, raw, "static"), key, "lowered.static")
              for key in ("batch", "prompt_length", "cache_length")}
    if None in static.values():
        raise malformed(path, "has a tensorrt program without `lowered.static` batch, prompt_length "
                              "and cache_length")
    return static
