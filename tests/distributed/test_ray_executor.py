"""The Ray executor: a TIES merge compiled on a local Ray cluster (a head and two worker
nodes) is byte-identical to a local compile, also when a worker node is removed while the
output is being written."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray
from local_cluster import add_worker
from safetensors.torch import load_file, save_file

from cfmlang.api import compile
from cfmlang.cli import main
from cfmlang.compiler.executors import executor_named
from cfmlang.diagnostics import CompileError
from models import tiny_model

TIES = """model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
model c:
  source: hf "{c}"
merge tied:
  method: ties
  base: a
  inputs:
    b: {{weight: 0.6, density: 0.5}}
    c: {{weight: [0.2, 0.8], density: 0.7}}
  dtype: float32
output: tied
"""
CHUNK = 4096             # small row blocks: several per tensor


@pytest.fixture(autouse=True)
def reproducible(monkeypatch):
    """The manifest's one time-dependent field fixed, so that whole artifacts compare."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


@pytest.fixture(scope="module")
def ties_file(tiny_zoo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ties") / "ties.brick"
    path.write_text(TIES.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"], c=tiny_zoo["llama_c"]))
    return path


def artifact_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def local_artifact(ties_file: Path, folder: Path) -> dict[str, bytes]:
    compile(ties_file, folder, use_cache=False, chunk_bytes=CHUNK)
    return artifact_bytes(folder)


def test_ray_compile_is_byte_identical_and_spread_over_both_workers(cluster, ties_file, tmp_path):
    expected = local_artifact(ties_file, tmp_path / "local")
    lines = []
    compile(ties_file, tmp_path / "ray", use_cache=False, chunk_bytes=CHUNK, executor="ray",
            address=cluster[0].address, log=lines.append)
    assert artifact_bytes(tmp_path / "ray") == expected
    assert any("ran on 2 node(s) of the Ray cluster" in line for line in lines), lines


def test_ray_compile_through_the_cache_and_the_cli(cluster, ties_file, tmp_path, capsys):
    expected = local_artifact(ties_file, tmp_path / "local")
    out = tmp_path / "ray"
    code = main(["compile", str(ties_file), "-o", str(out), "--executor", "ray", "--address", cluster[0].address,
                 "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert code == 0, capsys.readouterr().err
    # the default chunk size differs from the local compile's; chunking never changes bytes
    assert artifact_bytes(out) == expected


def test_damaged_input_on_a_worker_is_the_local_diagnostic(cluster, tiny_zoo, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for item in Path(tiny_zoo["llama_c"]).iterdir():
        (damaged / item.name).write_bytes(item.read_bytes())
    state = load_file(damaged / "model.safetensors")
    name = "model.layers.2.mlp.up_proj.weight"
    state[name][3, 5] = float("nan")
    save_file(state, damaged / "model.safetensors", metadata={"format": "pt"})
    path = tmp_path / "ties.brick"
    path.write_text(TIES.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"], c=damaged))
    with pytest.raises(CompileError) as caught:
        compile(path, tmp_path / "out", use_cache=False, executor="ray", address=cluster[0].address)
    problem = caught.value.diagnostics[0]
    assert problem.code == "E080" and "input `c`" in problem.message and name in problem.message
    assert not (tmp_path / "out").exists()


def test_without_ray_installed_the_diagnostic_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)      # `import ray` raises ImportError
    with pytest.raises(CompileError) as caught:
        executor_named("ray")
    problem = caught.value.diagnostics[0]
    assert problem.code == "E240" and "pip install 'cfmlang[ray]'" in problem.help[0]


def test_an_address_needs_the_ray_executor(ties_file, tmp_path, capsys):
    assert main(["compile", str(ties_file), "-o", str(tmp_path / "out"), "--address", "10.0.0.1:6379"]) == 1
    assert "error[E243]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_worker_node_removed_mid_compile_changes_nothing(cluster, tmp_path):
    """The models are large enough (~12 MB) that each task's result (~1.5 MB) is held in
    its worker's object store, so removing the worker loses results not fetched yet as
    well as tasks running there: Ray must run them again. A new worker node takes its
    place afterwards (the cluster is the test session's)."""
    wide = dict(hidden_size=256, intermediate_size=512, vocab_size=512)
    models = {n: tiny_model(tmp_path / n, seed=i + 5, **wide) for i, n in enumerate("abc")}
    ties_file = tmp_path / "ties.brick"
    ties_file.write_text(TIES.format(**models))
    expected = local_artifact(ties_file, tmp_path / "local")
    head, workers = cluster
    written = []

    def remove_a_worker_after_the_first_tensor(done: int, total: int) -> None:
        written.append(done)
        if len(written) == 1:
            head.remove_node(workers[0])
    try:
        compile(ties_file, tmp_path / "ray", use_cache=False, chunk_bytes=CHUNK, executor="ray",
                address=head.address, progress=remove_a_worker_after_the_first_tensor)
        assert len(written) > 10 and artifact_bytes(tmp_path / "ray") == expected
        alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
        assert len(alive) == 1
    finally:
        workers[0] = add_worker(head)
        head.wait_for_nodes()
