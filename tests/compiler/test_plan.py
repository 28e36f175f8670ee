"""`cfmc plan`: what runs and what is cached, bytes, peak memory, time, and the refusal
of plans that do not fit in memory."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import cfmlang
from cfmlang.cli import main
from cfmlang.compiler.plan import BASELINE_BYTES
from cfmlang.ops.merge import BYTES_PER_SECOND
from test_cache import TENSORS, four_nodes


def model_bytes(folder: Path) -> int:
    """Bytes of tensor data in a model's safetensors file."""
    with open(folder / "model.safetensors", "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
    return (folder / "model.safetensors").stat().st_size - 8 - length


def test_plan_says_what_runs_and_compile_does_exactly_that(tiny_zoo, tmp_path, capsys):
    path = tmp_path / "f.brick"
    path.write_text(four_nodes(tiny_zoo))
    size = model_bytes(tiny_zoo["llama_a"])
    cold = cfmlang.plan(path)
    assert [(n.name, n.status) for n in cold.nodes] == [("a", "read"), ("b", "read"), ("m1", "run"), ("m2", "run")]
    m1, m2 = cold.node("m1"), cold.node("m2")
    assert (m1.bytes_read, m1.bytes_written) == (2 * size, size)       # reads a and b, writes itself
    assert (m2.bytes_read, m2.bytes_written) == (3 * size, size)       # base a, m1, b
    assert cold.bytes_read == 5 * size and cold.bytes_written == 2 * size
    # linear is elementwise: 7 row blocks of the largest tensor (tiny: the whole tensor)
    largest = 128 * 32 * 4
    assert m1.peak_bytes == (2 * 2 + 3) * largest
    assert m2.peak_bytes == (3 * 3 + 4) * largest                     # dare_ties: whole tensors
    assert cold.peak_bytes == BASELINE_BYTES + m2.peak_bytes          # nodes run one after another
    assert m1.seconds == m1.bytes_read / BYTES_PER_SECOND["linear"]
    assert m2.seconds == m2.bytes_read / BYTES_PER_SECOND["dare_ties"]
    result = cfmlang.compile(path, tmp_path / "out")
    assert {n for n, c in result.stats.items() if c} == {"a", "b", "m1", "m2"}

    path.write_text(four_nodes(tiny_zoo, w2=0.8))
    assert main(["plan", str(path)]) == 0
    table = capsys.readouterr().out
    assert [line.split()[:3] for line in table.splitlines()[1:5]] == [
        ["a", "model", "read"], ["b", "model", "read"], ["m1", "merge", "linear"], ["m2", "merge", "dare_ties"]]
    assert "cached" in table.splitlines()[3] and "run" in table.splitlines()[4]
    assert "1 to run, 1 cached" in table and "peak memory ~" in table
    assert main(["plan", str(path), "--format", "json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert [n["status"] for n in planned["nodes"]] == ["read", "read", "cached", "run"]
    assert planned["bytes_read"] == 3 * size and planned["available_bytes"] > 0
    changed = cfmlang.compile(path, tmp_path / "out")
    assert [n for n, c in changed.stats.items() if n.startswith("m")] == ["m2"]
    assert changed.stats["m2"] == TENSORS

    cfmlang.compile(path, tmp_path / "out")
    assert main(["plan", str(path)]) == 0
    assert "0 to run, 1 cached; reads 0 B, writes 0 B" in capsys.readouterr().out


def test_plan_without_cache_adds_up_working_sets(tiny_zoo, tmp_path):
    cfmlang.compile(four_nodes(tiny_zoo), tmp_path / "out")
    streamed = cfmlang.plan(four_nodes(tiny_zoo), use_cache=False)
    assert [n.status for n in streamed.nodes] == ["read", "read", "run", "run"]
    assert streamed.peak_bytes == BASELINE_BYTES + streamed.node("m1").peak_bytes + streamed.node("m2").peak_bytes


def test_plan_and_compile_refuse_what_does_not_fit_in_memory_unless_forced(tiny_zoo, tmp_path, capsys):
    path = tmp_path / "f.brick"
    path.write_text(four_nodes(tiny_zoo))
    need = cfmlang.plan(path).peak_bytes
    assert main(["plan", str(path), "--max-memory", str(need)]) == 0
    capsys.readouterr()
    assert main(["plan", str(path), "--max-memory", str(need - 1)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:10:1: error[E130]: this compile needs an estimated 400.2 MiB of memory at its peak " \
        "(node `m2`: 208.0 KiB), but only 400.2 MiB is available" in err
    assert "--force" in err
    assert main(["compile", str(path), "-o", str(tmp_path / "out"), "--max-memory", "100M"]) == 1
    assert "error[E130]" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["plan", str(path), "--max-memory", "100M", "--force"]) == 0
    assert "2 to run, 0 cached" in capsys.readouterr().out
    assert main(["compile", str(path), "-o", str(tmp_path / "out"), "--max-memory", "100M", "--force"]) == 0
    assert main(["plan", str(path), "--max-memory", "lots"]) == 1          # a user mistake, not argparse's 2
    err = capsys.readouterr().err
    assert "error[E215]" in err and "'lots' is not a size" in err


def test_kinds_that_run_the_model_are_planned_with_their_inputs_four_times_over(tmp_path):
    from models import tiny_model
    from test_experts import program

    model = tiny_model(tmp_path / "tiny", seed=7)
    planned = cfmlang.plan(program(model, "random", 4, 2, "oracle"))
    size = model_bytes(model)
    assert [(n.name, n.status) for n in planned.nodes] == [("m", "read"), ("e", "run"), ("r", "run")]
    assert planned.node("e").peak_bytes == planned.node("r").peak_bytes == 4 * size
    # the experts brick's cache entry: an int64 neuron order for each of the 4 layers of 64 neurons
    assert planned.node("e").bytes_written == 4 * 64 * 8 and planned.node("r").bytes_written == size
    assert planned.node("r").seconds is None and planned.seconds is None
