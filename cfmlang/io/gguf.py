"""Opening a model source for reading: HF directories and safetensors files as they are,
GGUF files converted once (dequantized, with their tokenizer) into a cached HF directory.

A conversion is sealed (`cfmlang.io.seal`: each file's size and SHA-256 in cfm-seal.json)
and the seal is checked on every use: a conversion with a changed, truncated or deleted
file is removed and converted again. A GGUF file replaced or rewritten while it was
converted fails (E080) instead of being stored under the old file's hash."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from cfmlang.artifact.write import atomic_directory, write_state_dict
from cfmlang.compiler.ir import Source
from cfmlang.io.seal import broken_seal, pin, seal_of
from cfmlang.io.sources import weight_files
from cfmlang.io.weights import PickleReader, SafetensorsReader, WeightError, file_identity, hashed_file

SEAL_FILE = "cfm-seal.json"
IN_USE: list = []
"""Conversions this process read, pinned (`seal.pin`) until it exits."""


def open_source(source: Source, allow_pickle: bool, cache_dir: Path, log=print):
    """(reader, directory holding config.json and tokenizer files) for a model source."""
    if source.kind == "gguf":
        folder = converted_gguf(Path(source.path), cache_dir, log)
        return SafetensorsReader(weight_files(folder, False)), folder
    if source.kind == "safetensors":
        return SafetensorsReader([Path(source.path)]), Path(source.path).parent
    folder = Path(source.path)
    files = weight_files(folder, allow_pickle)
    reader = PickleReader(files) if files[0].suffix == ".bin" else SafetensorsReader(files)
    return reader, folder


def converted_gguf(path: Path, cache_dir: Path, log=print) -> Path:
    """The cached HF directory converted from a GGUF file (converted on first use)."""
    digest, identity = hashed_file(path, cache_dir)
    target = cache_dir / "gguf" / digest
    held = None
    with contextlib.suppress(OSError):          # pinned before it is checked: not evicted meanwhile
        held = pin(target / SEAL_FILE)
    problem = conversion_problem(target)
    if problem is None and held is not None:
        IN_USE.append(held)
        with contextlib.suppress(OSError):   # last used: the cache evicts the least recently used
            os.utime(target)
        return target
    if held is not None:
        held.close()
    if target.exists():
        log(f"the cached conversion of {path.name} is damaged ({problem}); converting it again")
    log(f"converting {path.name} to safetensors once (cached in {target}) ...")
    with atomic_directory(target) as tmp:
        model, tokenizer = load_gguf(path)
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        write_state_dict(tmp, state)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        (tmp / SEAL_FILE).write_text(json.dumps(seal_of(tmp), indent=0, sort_keys=True))
        if file_identity(path) != identity:
            raise WeightError(f"{path} changed while it was converted; nothing was stored",
                              help="compile again once it is settled")
    with contextlib.suppress(OSError):
        IN_USE.append(pin(target / SEAL_FILE))
    return target


def conversion_problem(folder: Path) -> str | None:
    """Why the cached conversion in `folder` cannot be used (missing, or its seal
    broken), or None."""
    try:
        seal = json.loads((folder / SEAL_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return "missing" if not folder.exists() else "no seal"
    return broken_seal(folder, seal, skip=(SEAL_FILE,))


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"   # transformers' GGUF dequantizer draws its own bar
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = previous
    return model, tokenizer
