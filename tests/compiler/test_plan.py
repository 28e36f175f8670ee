"""`cfmc plan`: what runs and what is cached, bytes, peak memory, time, and the refusal
of plans that do not fit in memory."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

import cfmlang
from cfmlang.cli import main
from cfmlang.compiler.plan import BASELINE_BYTES, plan_table
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
    assert planned.node("r").seconds > 0 and planned.seconds > 0


@pytest.fixture(scope="module")
def artifact_programs(tmp_path_factory) -> Path:
    """tests/golden/artifacts/ (every node kind: sources, merges, grows, lora bricks read,
    combined, extracted and trained, attachments, routes over adapters, edits, fine-tuning,
    experts and their routes) beside the real tiny models they read."""
    from artifact_hashes import ARTIFACTS, build_artifact_models

    root = tmp_path_factory.mktemp("artifacts")
    build_artifact_models(root / "models")
    for program in ARTIFACTS.glob("*.brick"):
        (root / program.name).write_text(program.read_text())
    return root


def planned_as_output(folder: Path, file: str, node: str):
    text = (folder / file).read_text()
    program = folder / f"{file}.{node}.brick"
    program.write_text(text[:text.rindex("output:")] + f"output: {node}\n")
    return cfmlang.plan(program, use_cache=False, force=True)


def test_every_node_kind_has_a_time_estimate(artifact_programs):
    """No `unknown` time in a plan: each kind's estimate comes from the rate its
    operation declares (bytes copied, FLOPs of the model passes it makes)."""
    from artifact_hashes import ARTIFACT_NODES

    kinds = set()
    for file, nodes in ARTIFACT_NODES.items():
        for name in nodes:
            plan = planned_as_output(artifact_programs, file, name)
            for node in plan.working:
                assert node.seconds is not None and node.seconds < 3600, (file, node)
                if node.status == "run":
                    assert node.seconds > 0, (file, node)
                    kinds.add(node.op)
            assert "unknown" not in plan_table(plan)
    assert {"attach", "lora_train", "lora_extract", "lora_merge ties", "lora_source", "route retrieve", "route gate",
            "update rome", "update memit", "update finetune", "experts", "route topk", "grow widen",
            "grow upcycle"} <= kinds, kinds


def test_training_estimates_grow_with_the_work_asked(artifact_programs):
    """Twice the steps of a lora brick, twice its planned training time; an edit's value
    search grows with its steps."""
    text = (artifact_programs / "adapters.brick").read_text()
    times = {}
    for steps in (4, 8):
        program = artifact_programs / f"steps{steps}.brick"
        program.write_text(text.replace("steps: 4,", f"steps: {steps},")[:text.rindex("output:")] + "output: tone\n")
        times[steps] = cfmlang.plan(program, use_cache=False).node("tone").seconds
    assert times[8] == pytest.approx(2 * times[4])
    few, many = (cfmlang.plan((artifact_programs / "updates.brick").read_text().replace("steps: 6", f"steps: {n}")
                              .replace('"models/', f'"{artifact_programs}/models/'), use_cache=False)
                 .node("edited").seconds for n in (6, 60))
    assert many > few


def test_a_huge_widen_is_planned_with_its_real_working_set(artifact_programs, capsys):
    """widen to 10^8 neurons holds each widened projection (10^8 x 32 floats) five times
    over in float32 terms while computing it: the plan says so and refuses it."""
    program = artifact_programs / "wide.brick"
    program.write_text('model a:\n  source: hf "models/a"\ngrow wide:\n  method: widen\n  from: a\n'
                       "  intermediate_size: 100000000\noutput: wide\n")
    plan = cfmlang.plan(program, use_cache=False, force=True)
    projection = 100_000_000 * 32 * 4
    assert plan.node("wide").peak_bytes == 6 * projection and plan.peak_bytes > 70 * 2**30
    assert main(["plan", str(program), "--no-cache", "--max-memory", "64G"]) == 1
    err = capsys.readouterr().err
    assert "error[E130]" in err and "(node `wide`: 71.5 GiB)" in err


def test_an_absurd_upcycle_is_refused_at_once(artifact_programs, capsys):
    """`experts: 10^9` would list 1.2 x 10^10 tensors; the check refuses it before listing any."""
    program = artifact_programs / "up.brick"
    program.write_text('model a:\n  source: hf "models/a"\ngrow moe:\n  method: upcycle\n  from: a\n'
                       "  experts: 1000000000\noutput: moe\n")
    start = time.perf_counter()
    assert main(["plan", str(program)]) == 1
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err
    assert "error[E310]" in err and "would write 12,000,000,043 tensors" in err
