"""`cfmc analyze --executor ray`: the forward passes over the probe prompts of a tiny
model's analysis run in shards on both worker nodes of the local cluster, and the report
is the local one, number for number (analysis.json byte for byte)."""
from __future__ import annotations

import json
import operator

import pytest
import torch
from planted import planted_model, write_probes
from safetensors import safe_open

from cfmlang.analysis.activations import Batch, batch_activations
from cfmlang.analysis.ray_shards import RayShards, cut
from cfmlang.cli import main
from cfmlang.diagnostics import CompileError

pytestmark = pytest.mark.usefixtures("one_thread")     # the local run's kernels as the workers' (one thread)

QUICK = ["--levels", "0,50", "--cett", "0.2", "--eval-per-ability", "6", "--cett-tokens", "64",
         "--batch-tokens", "96"]     # small batches: the 48 prompts make 6 of them, the 18 evaluation prompts 2


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    folder = planted_model(root / "model")
    return folder, write_probes(root / "probes", folder, per_ability=16)


def test_analysis_on_the_cluster_equals_the_local_one(cluster, planted, tmp_path, capsys):
    folder, probes = planted
    common = ["analyze", str(folder), "--probes", str(probes), *QUICK]
    assert main([*common, "-o", str(tmp_path / "local"), "-q"]) == 0, capsys.readouterr().err
    code = main([*common, "-o", str(tmp_path / "ray"), "--executor", "ray", "--address", cluster[0].address])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "task(s) ran on 2 node(s) of the Ray cluster" in err, err
    assert (tmp_path / "ray" / "analysis.json").read_bytes() == (tmp_path / "local" / "analysis.json").read_bytes()
    # safetensors writes its metadata in an order of its own choosing: compare the contents
    with safe_open(tmp_path / "ray" / "func_scores.safetensors", "pt") as ray_scores, \
            safe_open(tmp_path / "local" / "func_scores.safetensors", "pt") as local_scores:
        assert ray_scores.metadata() == local_scores.metadata()
        assert sorted(ray_scores.keys()) == sorted(local_scores.keys()) == ["baseline", "func_scores"]
        for key in local_scores.keys():
            assert torch.equal(ray_scores.get_tensor(key), local_scores.get_tensor(key)), key
    report = json.loads((tmp_path / "ray" / "analysis.json").read_text())
    # the numbers compared are the analysis's, not empty ones
    assert report["probes"]["prompts"] == [16, 16, 16] and report["sparse_activation"]["eval_prompts"] == 18
    assert all(p > 1 for p in report["perturbation"]["perplexity"])


def test_shards_are_runs_of_consecutive_batches():
    assert cut(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert cut([1, 2], 4) == [[1], [2]]


def test_a_failing_shard_is_a_diagnostic(cluster):
    with pytest.raises(CompileError) as caught:
        RayShards(None).map(1, operator.truediv, [1, 0], lambda: None)
    problem = caught.value.diagnostics[0]
    assert problem.code == "E244" and "ZeroDivisionError" in problem.message and "cfmlang" in problem.help[0]


def test_a_diagnostic_raised_on_a_worker_is_the_local_one(cluster):
    """A model without a gated FFN, sent to the workers as it is: their E161 arrives whole."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8,
                                      bos_token_id=0, eos_token_id=0))
    with pytest.raises(CompileError) as caught:
        one_prompt = Batch(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 1]]), (0,))
        RayShards(None).map(gpt2, batch_activations, [one_prompt], lambda: None)
    problem = caught.value.diagnostics[0]
    assert problem.code == "E161" and "GPT2LMHeadModel has no gated FFN" in problem.message


def test_an_address_needs_the_ray_executor(planted, tmp_path, capsys):
    folder, probes = planted
    code = main(["analyze", str(folder), "--probes", str(probes), "-o", str(tmp_path / "out"),
                 "--address", "10.0.0.1:6379"])
    assert code == 1 and "error[E243]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
