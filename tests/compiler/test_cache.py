"""The content-addressed node cache: keys, reuse, invalidation, eviction, atomic entries,
and determinism of artifacts across runs and processes."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch
from safetensors.torch import load_file, save_file

import cfmlang
from cfmlang.cli import main
from cfmlang.compiler.cache import ENTRY_FILE, Cache, parse_size
from cfmlang.compiler.ir import CheckedProgram
from cfmlang.compiler.keys import node_keys

FOUR_NODES = """model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
merge m1:
  method: linear
  inputs:
    a: {{weight: {w1}}}
    b: {{weight: 0.5}}
merge m2:
  method: dare_ties
  base: a
  seed: 7
  inputs:
    m1: {{weight: 0.6, density: 0.5}}
    b: {{weight: {w2}, density: 0.7}}
output: m2
"""
TENSORS = 39   # in a tiny model


def four_nodes(zoo, w1=0.5, w2=0.4) -> str:
    return FOUR_NODES.format(a=zoo["llama_a"], b=zoo["llama_b"], w1=w1, w2=w2)


def ran(result) -> list[str]:
    return [n.name for n in result.plan.nodes if n.status == "run"]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def manifest_without_time(folder: Path) -> dict:
    manifest = json.loads((folder / "cfm.json").read_text())
    assert manifest.pop("created").endswith("Z")
    return manifest


def test_changing_one_merge_weight_reruns_exactly_that_node(tiny_zoo, tmp_path):
    first = cfmlang.compile(four_nodes(tiny_zoo), tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert ran(first) == ["m1", "m2"] and first.stats == {"a": 2 * TENSORS, "b": 2 * TENSORS,
                                                          "m1": TENSORS, "m2": TENSORS}
    changed = cfmlang.compile(four_nodes(tiny_zoo, w2=0.9), tmp_path / "out")
    assert ran(changed) == ["m2"]
    assert changed.plan.node("m1").status == "cached"
    merges_computed = {n: count for n, count in changed.stats.items() if n.startswith("m")}
    assert merges_computed == {"m2": TENSORS}
    # the reused m1 gives exactly what a compile from scratch gives
    fresh = cfmlang.compile(four_nodes(tiny_zoo, w2=0.9), tmp_path / "fresh", use_cache=False)
    assert fresh.stats["m1"] == TENSORS
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "fresh" / "model.safetensors").read_bytes()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != before
    # a change upstream reruns the node and its dependant
    upstream = cfmlang.compile(four_nodes(tiny_zoo, w1=0.2, w2=0.9), tmp_path / "out")
    assert ran(upstream) == ["m1", "m2"]


def test_second_compile_of_unchanged_file_does_no_tensor_work(tiny_zoo, tmp_path):
    text = four_nodes(tiny_zoo)
    cfmlang.compile(text, tmp_path / "one")
    again = cfmlang.compile(text, tmp_path / "two")
    assert again.stats == {}     # no provider was even created: no tensor read or computed
    assert {n.name: n.status for n in again.plan.nodes} == {"a": "skip", "b": "skip", "m1": "skip",
                                                             "m2": "cached"}
    entry = again.plan.entries["m2"].path
    # the artifact's weights are the cache entry's file, hard-linked, not rewritten
    assert (tmp_path / "two" / "model.safetensors").stat().st_ino == (entry / "model.safetensors").stat().st_ino
    assert manifest_without_time(tmp_path / "one") == manifest_without_time(tmp_path / "two")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_keys_ignore_layout_and_comments_but_see_parameters_and_contents(tiny_zoo, tmp_path):
    text = four_nodes(tiny_zoo)
    keys = cfmlang.plan(text).node
    moved = "# a comment\n\n" + text.replace("model b:", "\n# b\nmodel b:")
    assert cfmlang.plan(moved).node("m2").key == keys("m2").key
    reordered = text.replace("m1: {weight: 0.6, density: 0.5}\n    b: {weight: 0.4, density: 0.7}",
                             "b: {weight: 0.4, density: 0.7}\n    m1: {weight: 0.6, density: 0.5}")
    assert reordered != text and cfmlang.plan(reordered).node("m2").key != keys("m2").key
    seeded = text.replace("seed: 7", "seed: 8")
    assert cfmlang.plan(seeded).node("m1").key == keys("m1").key
    assert cfmlang.plan(seeded).node("m2").key != keys("m2").key
    assert cfmlang.plan("seed: 3\n" + text).node("m1").key != keys("m1").key   # program settings
    # a filter map's order is meaning (first match wins): a different order, a different key
    filters = [text.replace("a: {weight: 0.5}", f"a: {{weight: {m}}}")
               for m in ("{mlp: 0.1, self_attn: 0.2, default: 0.3}", "{self_attn: 0.2, mlp: 0.1, default: 0.3}")]
    assert cfmlang.plan(filters[0]).node("m1").key != cfmlang.plan(filters[1]).node("m1").key


def test_changed_input_file_reruns_its_consumers(tiny_zoo, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_zoo["llama_b"], b)
    text = FOUR_NODES.format(a=tiny_zoo["llama_a"], b=b, w1=0.5, w2=0.4)
    cfmlang.compile(text, tmp_path / "out")
    weights = load_file(b / "model.safetensors")
    weights["lm_head.weight"][0, 0] += 1.0          # same size, new content
    save_file(weights, b / "model.safetensors", metadata={"format": "pt"})
    result = cfmlang.compile(text, tmp_path / "out")
    assert ran(result) == ["m1", "m2"]
    fresh = cfmlang.compile(text, use_cache=False)
    assert torch.equal(tensors(tmp_path / "out")["model.norm.weight"], tensors(fresh.output_dir)["model.norm.weight"])


def test_damaged_entry_is_dropped_and_rebuilt(tiny_zoo, tmp_path):
    text = four_nodes(tiny_zoo)
    first = cfmlang.compile(text, tmp_path / "out")
    good = (tmp_path / "out" / "model.safetensors").read_bytes()
    damaged = Cache().node_path(first.plan.node("m2").key) / "model.safetensors"
    damaged.chmod(0o644)
    with open(damaged, "r+b") as handle:     # e.g. someone edited the hard-linked artifact
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\0\0\0\0")
    again = cfmlang.compile(text, tmp_path / "again")
    assert ran(again) == ["m2"]
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == good


def test_entries_are_read_only_and_evicted_least_recently_used_first(tiny_zoo, tmp_path, monkeypatch):
    cache = Cache()
    cfmlang.compile(four_nodes(tiny_zoo, w2=0.1), tmp_path / "o")
    entry_bytes = max(e.bytes for e in cache.entries())
    assert all(p.stat().st_mode & 0o222 == 0 for p in (cache.root / "nodes").glob("*/*"))
    monkeypatch.setenv("CFM_CACHE_SIZE", str(int(3.5 * entry_bytes)))
    cfmlang.compile(four_nodes(tiny_zoo, w2=0.2), tmp_path / "o")   # m1 reused: 3 entries
    assert len(Cache().entries()) == 3
    cfmlang.compile(four_nodes(tiny_zoo, w2=0.3), tmp_path / "o")   # a 4th: the oldest m2 goes
    left = {json.loads((e.path / ENTRY_FILE).read_text())["node"] for e in Cache().entries()}
    assert len(Cache().entries()) == 3 and left == {"m1", "m2"}
    outputs = [e for e in Cache().entries() if "m2" in e.what]
    assert cfmlang.compile(four_nodes(tiny_zoo, w2=0.1), tmp_path / "o").plan.node("m2").status == "run"
    assert len(outputs) == 2


def test_cache_ls_and_clear(tiny_zoo, tmp_path, capsys):
    cfmlang.compile(four_nodes(tiny_zoo), tmp_path / "out")
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "m1: merge linear" in out and "m2: merge dare_ties" in out and "2 entries" in out
    assert main(["cache", "ls", "--format", "json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert sorted(e["what"].split(":")[0] for e in listing["entries"]) == ["m1", "m2"]
    shared = Cache().root / "gguf"
    assert shared.is_symlink()        # the conversions shared by the tests are left alone
    assert main(["cache", "clear"]) == 0
    assert Cache().entries() == [] and shared.is_symlink() and shared.resolve().is_dir()
    assert ran(cfmlang.compile(four_nodes(tiny_zoo), tmp_path / "out")) == ["m1", "m2"]


def test_sizes():
    assert parse_size("50G") == 50 * 1024**3 and parse_size("1.5k") == 1536 and parse_size("12") == 12
    assert parse_size("500MiB") == 500 * 1024**2 and parse_size("lots") is None and parse_size("-1") is None


def test_bad_cache_size_is_a_diagnostic(tiny_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CFM_CACHE_SIZE", "huge")
    path = tmp_path / "f.brick"
    path.write_text(four_nodes(tiny_zoo))
    assert main(["compile", str(path), "-o", str(tmp_path / "o")]) == 1
    assert "error[E131]: CFM_CACHE_SIZE='huge' is not a size" in capsys.readouterr().err


KILL_WHILE_STORING = (
    "import os, signal, sys\n"
    "import cfmlang.artifact.write as art\n"
    "real = art.write_shard\n"
    "def dying(path, specs, produce, on_tensor, chunk_bytes):\n"
    "    def hook(spec):\n"
    "        on_tensor(spec)\n"
    "        if spec.name.endswith('layers.1.mlp.up_proj.weight') and os.environ['KILL_IN'] in str(path):\n"
    "            os.kill(os.getpid(), signal.SIGKILL)\n"
    "    real(path, specs, produce, hook, chunk_bytes)\n"
    "art.write_shard = dying\n"
    "from cfmlang.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


def test_kill_while_storing_an_entry_leaves_the_cache_usable(tiny_zoo, tmp_path):
    path = tmp_path / "f.brick"
    path.write_text(four_nodes(tiny_zoo))
    cache = Cache()
    m1_key = cfmlang.plan(path).node("m1").key
    proc = subprocess.run([sys.executable, "-c", KILL_WHILE_STORING, "compile", str(path), "-o",
                           str(tmp_path / "out"), "-q"], env={**os.environ, "KILL_IN": m1_key[:12]},
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    assert cache.entries() == [] and not (tmp_path / "out").exists()
    result = cfmlang.compile(path, tmp_path / "out")
    assert ran(result) == ["m1", "m2"]
    fresh = cfmlang.compile(path, use_cache=False)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (fresh.output_dir / "model.safetensors").read_bytes()


def test_artifacts_are_byte_identical_across_processes_and_cache_modes(tiny_zoo, tmp_path):
    """Two separate `cfmc` processes with separate caches, and a streamed compile without
    cache, write the same bytes; with SOURCE_DATE_EPOCH even the manifest's time agrees."""
    path = tmp_path / "f.brick"
    path.write_text(four_nodes(tiny_zoo))
    outputs = []
    for run in ("one", "two"):
        env = {**os.environ, "CFM_CACHE_DIR": str(tmp_path / f"cache-{run}"), "SOURCE_DATE_EPOCH": "1700000000"}
        proc = subprocess.run([sys.executable, "-m", "cfmlang", "compile", str(path), "-o",
                               str(tmp_path / run), "-q"], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outputs.append(tmp_path / run)
    cfmlang.compile(path, tmp_path / "streamed", use_cache=False)
    outputs.append(tmp_path / "streamed")
    names = sorted(p.name for p in outputs[0].iterdir())
    assert "cfm.json" in names and "model.safetensors" in names
    for other in outputs[1:]:
        assert sorted(p.name for p in other.iterdir()) == names
        for name in names:
            if name != "cfm.json":
                assert (outputs[0] / name).read_bytes() == (other / name).read_bytes(), name
    assert (outputs[0] / "cfm.json").read_bytes() == (outputs[1] / "cfm.json").read_bytes()
    assert json.loads((outputs[0] / "cfm.json").read_text())["created"] == "2023-11-14T22:13:20Z"
    assert manifest_without_time(outputs[0]) == manifest_without_time(outputs[2])


@dataclasses.dataclass(frozen=True)
class FutureNode:
    """A node kind the key walk has never seen (as another engineer would add one)."""

    name: str
    span: object
    source_node: str
    every: int
    scale: float
    payload: object = None
    node_type: str = "model"

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.source_node,)


def test_a_new_node_kind_is_keyed_by_its_fields_without_any_code(tiny_zoo):
    from cfmlang.diagnostics import Span

    model = cfmlang.check(f'model a:\n  source: hf "{tiny_zoo["llama_a"]}"\n').nodes[0]

    def keys(*extra):
        program = CheckedProgram("<t>", (model, *extra), None, 0, None, ())
        graph = nx.DiGraph()
        graph.add_nodes_from(n.name for n in program.nodes)
        graph.add_edges_from((n.deps[0], n.name) for n in extra)
        return node_keys(program, graph, Cache().file_hash)

    grow = FutureNode("g", Span("<t>", 1, 1, 1, 2), "a", every=4, scale=0.5)
    base = keys(grow)["g"]
    assert base is not None
    assert keys(dataclasses.replace(grow, span=Span("<t>", 9, 9, 9, 9)))["g"] == base
    assert keys(dataclasses.replace(grow, every=2))["g"] != base
    assert keys(dataclasses.replace(grow, scale=0.25))["g"] != base
    # a value it cannot hash makes the node (and what reads it) uncacheable, never wrong
    opaque = dataclasses.replace(grow, payload=torch.zeros(2))
    after = FutureNode("h", None, "g", every=1, scale=1.0)
    assert keys(opaque, after) == {"a": keys()["a"], "g": None, "h": None}


@pytest.mark.parametrize("cached", [True, False])
def test_lora_extract_output_is_cached_with_its_manifest_fields(tiny_zoo, tmp_path, cached):
    text = (f'model base:\n  source: hf "{tiny_zoo["llama_a"]}"\n'
            f'model tuned:\n  source: hf "{tiny_zoo["llama_b"]}"\n'
            "brick d:\n  kind: lora\n  extract: {from: tuned, base: base, rank: 4}\noutput: d\n")
    first = cfmlang.compile(text, tmp_path / "one", use_cache=cached)
    second = cfmlang.compile(text, tmp_path / "two", use_cache=cached)
    assert ran(second) == ([] if cached else ["d"])
    assert manifest_without_time(tmp_path / "one") == manifest_without_time(tmp_path / "two")
    assert second.manifest["adapter"] == first.manifest["adapter"] and second.manifest["kind"] == "peft-lora"
    assert (tmp_path / "two" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "one" / "adapter_model.safetensors").read_bytes()


def test_routed_output_is_cached_and_its_calibration_text_is_part_of_the_key(tmp_path, tmp_path_factory):
    from test_experts import program, save_char_tokenizer

    from models import tiny_model

    model = tiny_model(tmp_path / "tiny", seed=7)
    save_char_tokenizer(model)
    text_file = tmp_path / "calibration.txt"
    text_file.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    source = program(model, "cooccurrence", 4, 2, "similarity", layers="0:2").replace(
        "  calibration_tokens: 512\nroute", f'  calibration: "{text_file}"\n  calibration_tokens: 256\nroute')
    assert "calibration: " in source
    first = cfmlang.compile(source, tmp_path / "one")
    second = cfmlang.compile(source, tmp_path / "two")
    assert ran(second) == [] and second.stats == {}
    assert manifest_without_time(tmp_path / "one") == manifest_without_time(tmp_path / "two")
    assert second.manifest["routing"] == first.manifest["routing"]
    for name in ("model.safetensors", "routing.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    text_file.write_text("a completely different calibration text, with other words. " * 40)
    assert ran(cfmlang.compile(source, tmp_path / "three")) == ["e", "r"]
