"""The artifact writer's pipeline: blocks produced on a worker thread one block ahead of
the writer, written in order, errors surfacing in the caller, nothing left running."""
import threading

import pytest
import torch
from safetensors.torch import load_file

from cfmlang.artifact.write import held_producer, held_specs, write_shard
from cfmlang.io.weights import WeightError


def state(count=4, rows=64, cols=48):
    generator = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(rows, cols, generator=generator) for i in range(count)}


def test_blocks_are_written_in_order_with_small_chunks(tmp_path):
    tensors = state()
    chunk = 5 * 48 * 4                         # 5 rows per block: 13 blocks per tensor
    write_shard(tmp_path / "m.safetensors", held_specs(tensors), held_producer(tensors),
                chunk_bytes=chunk)
    loaded = load_file(tmp_path / "m.safetensors")
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_next_tensor_is_produced_while_the_current_one_is_written(tmp_path):
    """on_tensor(t0) runs after t0's bytes are written; it waits for the producer to
    start on t1. Without a producer thread working ahead this times out."""
    tensors = state(count=2)
    serve = held_producer(tensors)
    producing_t1 = threading.Event()
    producer_threads = set()

    def produce(name, rows):
        producer_threads.add(threading.current_thread().name)
        if name == "t1":
            producing_t1.set()
        return serve(name, rows)

    overlapped = []
    write_shard(tmp_path / "m.safetensors", held_specs(tensors), produce,
                on_tensor=lambda spec: overlapped.append(spec.name == "t1" or producing_t1.wait(10)))
    assert overlapped == [True, True]
    assert threading.main_thread().name not in producer_threads


def test_on_tensor_is_called_once_per_tensor_after_its_last_block(tmp_path):
    tensors = {"a": torch.ones(10, 4), "empty": torch.ones(0, 4), "scalar": torch.tensor(3.0)}
    seen = []
    write_shard(tmp_path / "m.safetensors", held_specs(tensors), held_producer(tensors),
                on_tensor=lambda spec: seen.append(spec.name), chunk_bytes=16)
    assert seen == ["a", "empty", "scalar"]
    loaded = load_file(tmp_path / "m.safetensors")
    assert torch.equal(loaded["scalar"], tensors["scalar"]) and loaded["empty"].shape == (0, 4)


def test_a_producer_error_reaches_the_caller_and_stops_the_worker(tmp_path):
    tensors = state()
    serve = held_producer(tensors)

    def produce(name, rows):
        if name == "t2":
            raise WeightError("tensor `t2` is missing")
        return serve(name, rows)

    before = threading.active_count()
    with pytest.raises(WeightError, match="t2"):
        write_shard(tmp_path / "m.safetensors", held_specs(tensors), produce)
    assert threading.active_count() == before


def test_a_block_of_the_wrong_shape_is_reported_with_its_tensor_name(tmp_path):
    tensors = state(count=2)
    specs = held_specs(tensors)
    with pytest.raises(WeightError, match=r"`t1` came out as \[3, 3\]"):
        write_shard(tmp_path / "m.safetensors", specs,
                    lambda name, rows: tensors[name] if name == "t0" else torch.zeros(3, 3))
