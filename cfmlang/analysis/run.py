"""The §4 analysis of Configurable Foundation Models (arXiv 2409.02877) on one model:
sparse activation, functional specialisation, perturbation, partitions."""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from cfmlang.analysis.activations import (batch_count, down_weights, ffn_sites, instance_activations,
                                          token_activations)
from cfmlang.analysis.funcscore import (scores_from_activations, shuffled, summarize_layers, top_neurons,
                                        top_permille_rank)
from cfmlang.analysis.indicators import INDICATORS, masked_count
from cfmlang.analysis.perturbation import jaccard, layer_overlap, overlap, perplexity_with, random_neurons
from cfmlang.analysis.probes import Probes
from cfmlang.analysis.shards import LOCAL, Shards
from cfmlang.analysis.sparsity import calibrate_cett, cett_loss, loss_curve, mean_loss, sample_tokens
from cfmlang.diagnostics import CompileError, error

DEFAULT_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DEFAULT_CETT_TARGETS = (0.05, 0.1, 0.2, 0.3)


@dataclass(frozen=True)
class Settings:
    levels: tuple[float, ...] = DEFAULT_LEVELS        # masked fractions for the loss curves
    cett_targets: tuple[float, ...] = DEFAULT_CETT_TARGETS
    eval_per_ability: int = 6       # prompts per ability for the sparse-activation losses
    cett_tokens: int = 512          # calibration tokens for the CETT thresholds
    cett_iterations: int = 20       # bisection steps per threshold
    top_fraction: float = 0.05      # share of each layer's neurons attributed to an ability
    permille: float = 5.0           # the "5‰-best" neuron of a layer
    seed: int = 0                   # shuffled-label baseline, random control, token sample
    max_batch_tokens: int = 2048    # padded tokens per forward pass

    def problems(self) -> list:
        found = []
        if not self.levels or any(not 0 <= f < 1 for f in self.levels):
            found.append("masking levels must lie in [0, 100) percent")
        if not self.cett_targets or any(not 0 < t < 1 for t in self.cett_targets):
            found.append("CETT targets must lie strictly between 0 and 1")
        if not 0 < self.top_fraction < 1:
            found.append("the top fraction must lie strictly between 0 and 1")
        if self.eval_per_ability < 1 or self.cett_tokens < 1 or self.max_batch_tokens < 1:
            found.append("--eval-per-ability, --cett-tokens and --batch-tokens must be positive")
        return [error("E163", f"invalid analysis setting: {p}", None, "see `cfmc analyze --help`")
                for p in found]


class Progress(Protocol):
    def stage(self, title: str, steps: int) -> Callable[[], None]:
        """Announce a stage of `steps` steps; the returned function marks one step done."""


class Silent:
    def stage(self, title: str, steps: int) -> Callable[[], None]:
        return lambda: None


@dataclass(frozen=True)
class Analysis:
    report: dict                    # every number, JSON-ready
    scores: torch.Tensor            # FuncScore [layers, neurons, abilities]
    baseline_scores: torch.Tensor   # the same with shuffled labels


DEFAULTS, SILENT = Settings(), Silent()


def analyze(model, probes: Probes, settings: Settings = DEFAULTS, progress: Progress = SILENT,
            shards: Shards = LOCAL) -> Analysis:
    """The whole analysis of `model` on `probes`; its forward passes run on `shards`
    (here by default, or a Ray cluster: the numbers are the same)."""
    problems = settings.problems()
    if problems:
        raise CompileError(problems)
    model.eval()
    options = {"max_batch_tokens": settings.max_batch_tokens, "shards": shards}
    steps = batch_count(probes, settings.max_batch_tokens)
    activations = instance_activations(model, probes, tick=progress.stage(
        "functional specialization: prompt activations", steps), **options)
    labels = torch.tensor(probes.labels)
    abilities = len(probes.abilities)
    scores = scores_from_activations(activations, labels, abilities)
    baseline = scores_from_activations(activations, shuffled(labels, settings.seed), abilities)
    sets = top_neurons(scores, settings.top_fraction)
    report = {
        "model": model_facts(model),
        "probes": probe_facts(probes),
        "settings": asdict(settings),
        "functional": functional_report(scores, baseline, settings),
        "partitions": partition_report(sets),
        "perturbation": perturbation_report(model, probes, sets, settings, progress, steps, shards),
        "sparse_activation": sparse_report(model, probes, settings, progress, shards),
    }
    report["headline"] = headline(report)
    return Analysis(report, scores, baseline)


def model_facts(model) -> dict:
    sites = ffn_sites(model)
    return {"class": type(model).__name__, "layers": len(sites), "neurons_per_layer": sites[0].in_features,
            "hidden_size": sites[0].out_features}


def probe_facts(probes: Probes) -> dict:
    counts = torch.bincount(torch.tensor(probes.labels), minlength=len(probes.abilities))
    tokens = [0] * len(probes.abilities)
    for sequence, label in zip(probes.sequences, probes.labels):
        tokens[label] += len(sequence)
    return {"abilities": list(probes.abilities), "prompts": counts.tolist(), "tokens": tokens}


def functional_report(scores: torch.Tensor, baseline: torch.Tensor, settings: Settings) -> dict:
    ours, chance = summarize_layers(scores, settings.permille), summarize_layers(baseline, settings.permille)
    return {
        "definition": "FuncScore(n, f) = average precision of the prompt-mean |a_n| at separating "
                      "ability f's prompts from the rest; baseline: the same with shuffled labels",
        "top_permille_rank": top_permille_rank(scores.shape[1], settings.permille) + 1,
        "per_ability": {k: v.T.tolist() for k, v in vars(ours).items()},       # [abilities][layers]
        "baseline": {k: v.T.tolist() for k, v in vars(chance).items()},
        "mean_over_abilities": {k: v.mean(1).tolist() for k, v in vars(ours).items()},   # [layers]
        "baseline_mean_over_abilities": {k: v.mean(1).tolist() for k, v in vars(chance).items()},
        "best_neuron": best_neurons(scores),
    }


def best_neurons(scores: torch.Tensor) -> list[dict]:
    """For each ability, the neuron with the highest FuncScore over the whole model."""
    _, neurons, abilities = scores.shape
    found = []
    for ability in range(abilities):
        flat = int(scores[:, :, ability].argmax())
        found.append({"layer": flat // neurons, "neuron": flat % neurons,
                      "score": float(scores[flat // neurons, flat % neurons, ability])})
    return found


def partition_report(sets: torch.Tensor) -> dict:
    abilities, layers, neurons = sets.shape
    per_layer = int(sets[0, 0].sum())
    return {
        "neurons_per_layer_and_ability": per_layer,
        "chance_overlap": per_layer / neurons,
        "overlap": overlap(sets).tolist(),           # [f][g] = |S_f ∩ S_g| / |S_f|
        "jaccard": jaccard(sets).tolist(),
        "overlap_per_layer": layer_overlap(sets).tolist(),
        "neurons": [[torch.nonzero(sets[f, layer]).flatten().tolist() for layer in range(layers)]
                    for f in range(abilities)],
    }


def perturbation_report(model, probes: Probes, sets: torch.Tensor, settings: Settings,
                        progress: Progress, steps: int, shards: Shards = LOCAL) -> dict:
    abilities, layers, neurons = sets.shape
    options = {"max_batch_tokens": settings.max_batch_tokens, "shards": shards}
    tick = progress.stage("perturbation: perplexity with each ability's neurons zeroed", steps * (abilities + 2))
    intact = perplexity_with(model, probes, None, tick=tick, **options)
    masked = torch.stack([perplexity_with(model, probes, sets[f], tick=tick, **options) for f in range(abilities)])
    control = random_neurons(layers, neurons, int(sets[0, 0].sum()), settings.seed)
    random_ppl = perplexity_with(model, probes, control, tick=tick, **options)
    return {
        "perplexity": intact.tolist(),
        "masked_perplexity": masked.tolist(),                   # [zeroed ability][measured ability]
        "relative_increase": (masked / intact - 1).tolist(),
        "random_control_perplexity": random_ppl.tolist(),
        "random_control_relative_increase": (random_ppl / intact - 1).tolist(),
    }


def sparse_report(model, probes: Probes, settings: Settings, progress: Progress, shards: Shards = LOCAL) -> dict:
    evaluation = probes.first_per_ability(settings.eval_per_ability)
    options = {"max_batch_tokens": settings.max_batch_tokens, "shards": shards}
    steps = batch_count(evaluation, settings.max_batch_tokens)
    width = ffn_sites(model)[0].in_features
    tick = progress.stage("sparse activation: loss against masked fraction",
                          steps * (2 + len(INDICATORS) * len(settings.levels)))
    dense = mean_loss(model, evaluation, tick=tick, **options)
    curves = {kind: loss_curve(model, evaluation, kind, settings.levels, tick=tick, **options)
              for kind in INDICATORS}
    sample = sample_tokens(token_activations(model, evaluation, tick=tick, **options),
                           settings.cett_tokens, settings.seed)
    weights = down_weights(model)
    tick = progress.stage("sparse activation: CETT thresholds",
                          len(settings.cett_targets) * (len(weights) + steps))
    cett = []
    for target in settings.cett_targets:
        layers = calibrate_cett(sample, weights, target, settings.cett_iterations, tick)
        loss = cett_loss(model, evaluation, layers, tick=tick, **options)
        cett.append({"target": target, "loss": loss,
                     "mean_sparsity": sum(t.sparsity for t in layers) / len(layers),
                     "thresholds": [t.threshold for t in layers],
                     "achieved_cett": [t.cett for t in layers],
                     "sparsity": [t.sparsity for t in layers]})
    return {
        "eval_prompts": len(evaluation.sequences), "eval_tokens": evaluation.tokens,
        "calibration_tokens": sample[0].shape[0],
        "dense_loss": dense,
        "levels": list(settings.levels),
        "masked_neurons": [masked_count(f, width) for f in settings.levels],
        "loss": curves,                                   # indicator -> [loss per level]
        "cett": cett,
    }


def headline(report: dict) -> dict:
    """The few numbers a reader wants first."""
    sparse, functional = report["sparse_activation"], report["functional"]
    perturbation = report["perturbation"]
    increase = perturbation["relative_increase"]
    abilities = len(increase)
    diagonal = [increase[f][f] for f in range(abilities)]
    off = [increase[f][g] for f in range(abilities) for g in range(abilities) if f != g]
    partitions = report["partitions"]
    pairs = [partitions["overlap"][f][g] for f in range(abilities) for g in range(abilities) if f != g]
    return {
        "dense_loss": sparse["dense_loss"],
        "loss_at_levels": {f"{100 * level:g}%": {k: sparse["loss"][k][i] for k in sparse["loss"]}
                           for i, level in enumerate(sparse["levels"])},
        "cett": {f"{entry['target']:g}": {"mean_sparsity": entry["mean_sparsity"], "loss": entry["loss"]}
                 for entry in sparse["cett"]},
        "funcscore_layer_average": {key: average(functional["mean_over_abilities"][key])
                                    for key in ("best", "top_permille", "mean")},
        "funcscore_layer_average_shuffled": {key: average(functional["baseline_mean_over_abilities"][key])
                                             for key in ("best", "top_permille", "mean")},
        "perturbation_mean_own_ability": average(diagonal),
        "perturbation_mean_other_abilities": average(off),
        "perturbation_median_own_ability": statistics.median(diagonal),
        "perturbation_median_other_abilities": statistics.median(off),
        "perturbation_rows_hurting_own_ability_most": sum(
            increase[f][f] == max(increase[f]) for f in range(abilities)),
        "perturbation_random_control_mean": average(perturbation["random_control_relative_increase"]),
        "partition_mean_pairwise_overlap": average(pairs),
        "partition_chance_overlap": partitions["chance_overlap"],
    }


def average(values) -> float:
    return sum(values) / len(values)
