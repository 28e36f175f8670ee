"""cfmc analyze: numeric checks on tiny random models (one with planted specialised
neurons that the analysis must find), the CLI, and one small run on SmolLM2."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from planted import ABILITIES, PLANTED, PLANTED_LAYER, planted_model, write_probes

from cfmlang.analysis import Settings, analyze, average_precision, func_scores, read_probes, tokenize
from cfmlang.analysis.activations import batches, ffn_sites, probe_nll
from cfmlang.analysis.funcscore import scores_from_activations, summarize_layers, top_neurons
from cfmlang.analysis.indicators import cett, cett_threshold, column_norms, mask_below, mask_lowest
from cfmlang.analysis.perturbation import ability_perplexity
from cfmlang.analysis.probes import Probes
from cfmlang.analysis.sparsity import mean_loss
from cfmlang.analysis.target import load_directory
from cfmlang.cli import main
from paths import REPO

SMALL = Settings(levels=(0.0, 0.5, 0.9), cett_targets=(0.2,), eval_per_ability=4, cett_tokens=256)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    folder = planted_model(root / "model")
    probe_dir = write_probes(root / "probes", folder, per_ability=16)
    loaded = load_directory(folder, "planted")
    texts, _ = read_probes(probe_dir)
    probes, _ = tokenize(texts, loaded.tokenizer, 64)
    return {"folder": folder, "probe_dir": probe_dir, "model": loaded.model, "probes": probes}


@pytest.fixture(scope="module")
def planted_analysis(planted):
    return analyze(planted["model"], planted["probes"], SMALL)


# ---------------------------------------------------------------- average precision

def brute_force_ap(scores: list[float], labels: list[bool]) -> float:
    """AP as the sum over distinct thresholds t (descending) of (recall step) x precision,
    predicting positive every item scoring >= t."""
    positives = sum(labels)
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        predicted = [label for score, label in zip(scores, labels) if score >= threshold]
        recall = sum(predicted) / positives
        total += (recall - previous_recall) * sum(predicted) / len(predicted)
        previous_recall = recall
    return total


def test_average_precision_of_a_hand_example():
    scores = torch.tensor([[3.0], [2.0], [1.0]])
    labels = torch.tensor([False, True, True])
    assert float(average_precision(scores, labels)) == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-12)
    assert float(average_precision(-scores, labels)) == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_average_precision_equals_brute_force_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    items = int(torch.randint(4, 40, (1,), generator=generator))
    scores = torch.randint(0, 6, (items, 25), generator=generator).float()   # many ties
    labels = torch.rand(items, generator=generator) < 0.4
    labels[0], labels[1] = True, False
    ours = average_precision(scores, labels)
    for column in range(scores.shape[1]):
        expected = brute_force_ap(scores[:, column].tolist(), labels.tolist())
        assert float(ours[column]) == pytest.approx(expected, abs=1e-12)


def test_scores_from_activations_is_ap_per_neuron_and_ability():
    generator = torch.Generator().manual_seed(3)
    activations = torch.rand(30, 2, 7, generator=generator).round(decimals=1)
    labels = torch.arange(30) % 3
    scores = scores_from_activations(activations, labels, 3)
    assert scores.shape == (2, 7, 3)
    for layer, neuron, ability in [(0, 0, 0), (1, 6, 2), (0, 3, 1)]:
        expected = brute_force_ap(activations[:, layer, neuron].tolist(), (labels == ability).tolist())
        assert float(scores[layer, neuron, ability]) == pytest.approx(expected, abs=1e-6)


def test_layer_summaries_and_top_sets():
    scores = torch.arange(2 * 1000 * 1, dtype=torch.float32).reshape(2, 1000, 1) / 2000
    summary = summarize_layers(scores)
    assert summary.best[:, 0].tolist() == pytest.approx([999 / 2000, 1999 / 2000])
    assert summary.top_permille[:, 0].tolist() == pytest.approx([995 / 2000, 1995 / 2000])  # 5th best
    chosen = top_neurons(scores, 0.05)
    assert chosen.shape == (1, 2, 1000) and chosen.sum() == 100
    assert chosen[0, 0, 950:].all() and not chosen[0, 0, :950].any()


# ---------------------------------------------------------------- indicators, masking, CETT

def test_mask_lowest_zeroes_exactly_the_lowest_indicator():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 40, generator=generator)
    norms = torch.rand(40, generator=generator) * 3
    for kind, indicator in (("activation", a.abs()), ("output", a.abs() * norms)):
        masked = mask_lowest(kind, 0.25, [norms])(0, a)
        zeroed = masked == 0
        assert (zeroed.sum(-1) == 10).all()
        assert torch.equal(masked[~zeroed], a[~zeroed])
        lowest_kept = indicator.masked_fill(zeroed, float("inf")).min(-1).values
        highest_dropped = indicator.masked_fill(~zeroed, float("-inf")).max(-1).values
        assert (highest_dropped <= lowest_kept).all()


def test_cett_matches_a_per_neuron_sum():
    generator = torch.Generator().manual_seed(1)
    a, weight = torch.randn(6, 12, generator=generator), torch.randn(5, 12, generator=generator)
    threshold = 0.8
    norms = column_norms(weight)
    for token in range(6):
        dropped = sum(a[token, i] * weight[:, i] for i in range(12) if abs(a[token, i]) * norms[i] < threshold)
        expected = torch.as_tensor(dropped).norm() / (weight @ a[token]).norm()
        assert float(cett(a, weight, threshold)[token]) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("target", [0.05, 0.2, 0.4])
def test_cett_threshold_hits_its_target(target):
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(400, 256, generator=generator) * torch.rand(256, generator=generator)
    weight = torch.randn(48, 256, generator=generator)
    found = cett_threshold(a, weight, target)
    assert found.cett == pytest.approx(target, abs=2e-3)
    assert float(cett(a, weight, found.threshold).mean()) == pytest.approx(found.cett)
    magnitude = a.abs() * column_norms(weight)
    assert found.sparsity == pytest.approx(float((magnitude < found.threshold).float().mean()))
    edited = mask_below([found.threshold], [column_norms(weight)])(0, a)
    assert float((edited == 0).float().mean()) == pytest.approx(found.sparsity)


def test_cett_sparsity_grows_with_the_target():
    generator = torch.Generator().manual_seed(4)
    a, weight = torch.randn(200, 128, generator=generator), torch.randn(32, 128, generator=generator)
    sparsities = [cett_threshold(a, weight, t).sparsity for t in (0.05, 0.2, 0.5)]
    assert sparsities == sorted(sparsities) and sparsities[0] < sparsities[-1]


# ---------------------------------------------------------------- losses through hooks

def hf_sequence_nll(model, sequence) -> float:
    ids = torch.tensor([sequence])
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=ids).loss) * (len(sequence) - 1)


def test_probe_nll_matches_transformers_loss(planted):
    model, probes = planted["model"], planted["probes"]
    nll, counts = probe_nll(model, probes, max_batch_tokens=256)
    assert len(list(batches(probes, 256))) > 1
    for index in (0, 17, len(probes.sequences) - 1):
        assert float(nll[index]) == pytest.approx(hf_sequence_nll(model, probes.sequences[index]), rel=1e-5)
        assert counts[index] == len(probes.sequences[index]) - 1


@pytest.mark.parametrize("kind", ["activation", "output"])
def test_masking_zero_percent_gives_the_unmasked_loss_exactly(planted, kind):
    model, probes = planted["model"], planted["probes"]
    norms = [column_norms(site.weight) for site in ffn_sites(model)]
    assert mean_loss(model, probes, mask_lowest(kind, 0.0, norms)) == mean_loss(model, probes)
    assert mean_loss(model, probes, mask_lowest(kind, 0.5, norms)) != mean_loss(model, probes)


def test_masking_every_neuron_equals_zeroing_down_proj(planted):
    model, probes = planted["model"], planted["probes"]
    norms = [column_norms(site.weight) for site in ffn_sites(model)]
    masked = mean_loss(model, probes, mask_lowest("activation", 1.0, norms))
    no_ffn = copy.deepcopy(model)
    for site in ffn_sites(no_ffn):
        site.weight.data.zero_()
    assert masked == pytest.approx(mean_loss(no_ffn, probes), rel=1e-6)


# ---------------------------------------------------------------- the planted model

def test_func_scores_find_the_planted_neurons(planted, planted_analysis):
    scores = func_scores(planted["model"], planted["probes"])
    assert scores.shape == (4, 64, 3)
    assert torch.equal(scores, planted_analysis.scores)
    for ability, name in enumerate(ABILITIES):
        per_ability = scores[:, :, ability]
        assert float(per_ability[PLANTED_LAYER, PLANTED[name]]) == 1.0
        others = per_ability.clone()
        others[PLANTED_LAYER, PLANTED[name]] = 0
        assert float(others.max()) < 1.0
        assert float(planted_analysis.baseline_scores[:, :, ability].max()) < 0.85


def test_func_scores_equal_ap_of_mean_activations_taken_from_the_mlp_input(planted):
    """An independent capture: the MLP's input x, then act(gate(x)) * up(x) by hand."""
    model, probes = planted["model"], planted["probes"]
    mlps = [layer.mlp for layer in model.model.layers]
    inputs = {}
    handles = [mlp.register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0]))
               for i, mlp in enumerate(mlps)]
    means = torch.zeros(len(probes.sequences), len(mlps), 64)
    with torch.inference_mode():
        for index, sequence in enumerate(probes.sequences):
            model(input_ids=torch.tensor([sequence]))
            for layer, mlp in enumerate(mlps):
                x = inputs[layer][0]
                a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
                means[index, layer] = a.abs().mean(0)
    for handle in handles:
        handle.remove()
    expected = scores_from_activations(means, torch.tensor(probes.labels), 3)
    assert torch.allclose(func_scores(model, probes), expected, atol=1e-6)


def test_report_of_the_planted_model(planted_analysis):
    report = planted_analysis.report
    assert report["model"] == {"class": "LlamaForCausalLM", "layers": 4, "neurons_per_layer": 64,
                               "hidden_size": 32}
    assert [b["layer"] for b in report["functional"]["best_neuron"]] == [PLANTED_LAYER] * 3
    assert [b["neuron"] for b in report["functional"]["best_neuron"]] == [PLANTED[a] for a in ABILITIES]
    best = report["functional"]["per_ability"]["best"]
    assert all(best[f][PLANTED_LAYER] == 1.0 for f in range(3))
    partitions = report["partitions"]
    assert partitions["neurons_per_layer_and_ability"] == 3          # round(5% of 64)
    assert all(PLANTED[name] in partitions["neurons"][f][PLANTED_LAYER] for f, name in enumerate(ABILITIES))
    assert [partitions["overlap"][f][f] for f in range(3)] == [1.0, 1.0, 1.0]
    increase = report["perturbation"]["relative_increase"]
    for f in range(3):     # zeroing an ability's neurons hurts that ability most
        assert increase[f][f] > 0.1
        assert increase[f][f] > 5 * max(abs(increase[f][g]) for g in range(3) if g != f)
    assert max(abs(v) for v in report["perturbation"]["random_control_relative_increase"]) < 0.02
    assert report["headline"]["perturbation_rows_hurting_own_ability_most"] == 3
    sparse = report["sparse_activation"]
    assert sparse["loss"]["activation"][0] == sparse["loss"]["output"][0] == sparse["dense_loss"]
    assert sparse["cett"][0]["achieved_cett"] == pytest.approx([0.2] * 4, abs=0.01)


def test_perturbation_entry_matches_zeroing_the_weights_by_hand(planted, planted_analysis):
    model, probes = planted["model"], planted["probes"]
    sets = planted_analysis.report["partitions"]["neurons"]
    intact = planted_analysis.report["perturbation"]["perplexity"]
    for ability in range(3):
        edited = copy.deepcopy(model)
        for layer, site in enumerate(ffn_sites(edited)):
            site.weight.data[:, sets[ability][layer]] = 0.0
        nll = torch.tensor([hf_sequence_nll(edited, s) for s in probes.sequences], dtype=torch.float64)
        counts = torch.tensor([len(s) - 1 for s in probes.sequences], dtype=torch.float64)
        ppl = ability_perplexity(nll, counts, torch.tensor(probes.labels), 3)
        expected = (ppl / torch.tensor(intact) - 1).tolist()
        assert planted_analysis.report["perturbation"]["relative_increase"][ability] == \
            pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_first_per_ability_keeps_order_and_counts():
    probes = Probes(("a", "b"), tuple((i, i + 1) for i in range(6)), (0, 1, 0, 1, 0, 1))
    assert probes.first_per_ability(2).sequences == ((0, 1), (1, 2), (2, 3), (3, 4))


# ---------------------------------------------------------------- probes

def test_shipped_probes_have_seven_abilities_of_at_least_40_prompts():
    texts, warnings = read_probes()
    assert texts.abilities == ("coding", "ethics", "knowledge", "linguistic", "math", "translation", "writing")
    assert all(len(p) >= 40 for p in texts.prompts) and not warnings
    every = [p for prompts in texts.prompts for p in prompts]
    assert len(set(every)) == len(every)
    assert all("---" not in p and p.strip() == p for p in every)


# ---------------------------------------------------------------- the command

def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["analyze", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


QUICK = ["--levels", "0,50", "--cett", "0.2", "--eval-per-ability", "2", "--cett-tokens", "64"]


def test_cli_writes_the_report(planted, tmp_path, capsys):
    out = tmp_path / "report"
    code, _, stderr = run_cli(capsys, planted["folder"], "-o", out, "--probes", planted["probe_dir"],
                                   "--max-prompts", "8", *QUICK)
    assert code == 0, stderr
    assert "functional specialization" in stderr and "perturbation" in stderr and "CETT" in stderr
    assert "W061" in stderr          # 16 prompts per ability: noisy scores
    names = {p.name for p in out.iterdir()}
    assert names == {"analysis.json", "func_scores.safetensors", "report.html", "sparse_activation.png",
                     "cett.png", "funcscore.png", "perturbation.png", "partitions.png"}
    report = json.loads((out / "analysis.json").read_text())
    assert report["probes"]["prompts"] == [8, 8, 8]
    assert report["sparse_activation"]["levels"] == [0.0, 0.5]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "<img" in html
    assert (out / "funcscore.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load_file

    assert load_file(out / "func_scores.safetensors")["func_scores"].shape == (4, 64, 3)


def test_cli_analyzes_a_brick_node(planted, tmp_path, capsys):
    brick = tmp_path / "two.brick"
    brick.write_text(f'model base:\n  source: hf "{planted["folder"]}"\nmodel other:\n'
                     f'  source: hf "{planted["folder"]}"\nmerge mix:\n  method: linear\n'
                     "  inputs: {base: {weight: 1.0}, other: {weight: 1.0}}\noutput: mix\n")
    code, stdout, stderr = run_cli(capsys, f"{brick}:base", "-o", tmp_path / "r", "--probes",
                                   planted["probe_dir"], "--max-prompts", "6", "--format", "json", *QUICK)
    assert code == 0, stderr
    headline = json.loads(stdout)["headline"]
    report = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert report["model"]["title"] == "two.brick:base"
    assert headline["dense_loss"] == report["sparse_activation"]["dense_loss"]
    code, _, stderr = run_cli(capsys, f"{brick}:nope", "-o", tmp_path / "r2", "--probes", planted["probe_dir"])
    assert code == 1 and "E160" in stderr and "declares no node named `nope`" in stderr


@pytest.mark.parametrize("case, code_expected", [
    ("missing_model", "E160"), ("no_tokenizer", "E161"), ("missing_probes", "E162"),
    ("one_ability", "E162"), ("bad_level", "E163"), ("foreign_output", "E082")])
def test_cli_errors(planted, tmp_path, capsys, case, code_expected):
    model, probes, out = planted["folder"], planted["probe_dir"], tmp_path / "out"
    extra = []
    if case == "missing_model":
        model = tmp_path / "nothing.brick"
    elif case == "no_tokenizer":
        model = tmp_path / "bare"
        model.mkdir()
        for name in ("config.json", "model.safetensors"):
            (model / name).write_bytes((planted["folder"] / name).read_bytes())
    elif case == "missing_probes":
        probes = tmp_path / "none"
    elif case == "one_ability":
        probes = write_probes(tmp_path / "single", model, 4, abilities=("alpha",))
    elif case == "bad_level":
        extra = ["--levels", "0,100"]
    else:
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    code, _, stderr = run_cli(capsys, model, "-o", out, "--probes", probes, *extra)
    assert code == 1, stderr
    assert f"error[{code_expected}]" in stderr and "help:" in stderr and "Traceback" not in stderr
    if case == "foreign_output":
        assert (out / "precious.txt").read_text() == "keep me"
    else:
        assert not out.exists()


def test_cli_without_matplotlib_says_how_to_install_it(planted, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)      # `import matplotlib` fails
    code, _, stderr = run_cli(capsys, planted["folder"], "-o", tmp_path / "out", "--probes", planted["probe_dir"])
    assert code == 1 and "error[E164]" in stderr and "cfmlang[analyze]" in stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- SmolLM2

def test_smollm2_analysis_at_a_small_budget(tmp_path, capsys):
    example = REPO / "examples" / "smol.brick"
    code, _, stderr = run_cli(capsys, f"{example}:smol", "-o", tmp_path / "smol", "--max-prompts", "3",
                              "--levels", "0,50,90", "--cett", "0.2", "--eval-per-ability", "1",
                              "--cett-tokens", "128")
    assert code == 0, stderr
    report = json.loads((tmp_path / "smol" / "analysis.json").read_text())
    assert report["model"]["layers"] == 30 and report["model"]["neurons_per_layer"] == 1536
    assert report["probes"]["prompts"] == [3] * 7
    sparse = report["sparse_activation"]
    assert 0.5 < sparse["dense_loss"] < 5.0
    for kind in ("activation", "output"):
        losses = sparse["loss"][kind]
        assert losses[0] == sparse["dense_loss"] and losses[0] < losses[1] < losses[2]
    assert sparse["cett"][0]["achieved_cett"] == pytest.approx([0.2] * 30, abs=0.02)
    assert 0.3 < sparse["cett"][0]["mean_sparsity"] < 1.0
    functional = report["headline"]       # layer averages of the 5-per-mille-best FuncScore
    assert functional["funcscore_layer_average"]["top_permille"] > \
        functional["funcscore_layer_average_shuffled"]["top_permille"]
    increase = report["perturbation"]["relative_increase"]
    assert sum(increase[f][f] for f in range(7)) / 7 > 0
