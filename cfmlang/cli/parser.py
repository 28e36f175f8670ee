"""The `cfmc` argument parser: one sub-command per command of commands.py."""
from __future__ import annotations

import argparse
from pathlib import Path

from cfmlang.analysis.probes import PROBE_TOKENS
from cfmlang.cli.commands import (cmd_analyze, cmd_bench, cmd_cache, cmd_check, cmd_compile, cmd_eval, cmd_fmt,
                                  cmd_graph,
                                  cmd_import, cmd_lsp, cmd_methods, cmd_plan, cmd_run, cmd_search)
from cfmlang.cluster import EXECUTORS
from cfmlang.compiler.lower import DECODE_KERNELS, PRECISIONS, PROGRAM_TARGETS, TARGETS
from cfmlang.eval.runner import DEFAULT_CONTEXT, DEFAULT_STRIDE

TRUST_CODE_HELP = ("load inductor/tensorrt programs (native code) that this machine did not build; "
                   "only for artifacts from someone you trust")


class UsageError(Exception):
    """A command line argparse refuses (a user mistake: exit 1 with E215, not argparse's 2)."""

    def __init__(self, usage: str, message: str):
        super().__init__(message)
        self.usage, self.message = usage, message


class Parser(argparse.ArgumentParser):
    """argparse, with its refusals raised as UsageError instead of exiting with status 2."""

    def error(self, message: str):
        raise UsageError(self.format_usage().strip(), message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cfmc", description="compile configurable foundation models")
    parser.add_argument("--version", action="version", version=f"cfmc {__import__('cfmlang').__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
        sub.add_argument("--verbose", action="store_true", help="also show third-party warnings, logs and bars")
        sub.set_defaults(run=run)
        return sub

    sub = command("check", cmd_check, "check a .brick file; exit 0 when valid")
    sub.add_argument("file", type=Path)
    sub.add_argument("--format", choices=("text", "json"), default="text", help="diagnostics format")

    sub = command("compile", cmd_compile, "compile a .brick file into an artifact directory")
    sub.add_argument("file", type=Path)
    sub.add_argument("-o", "--output", type=Path, required=True, help="artifact directory (replaced atomically)")
    sub.add_argument("--format", choices=("text", "json"), default="text", help="diagnostics format")
    cache_options(sub)
    memory_options(sub, "compile even when the estimated peak memory exceeds the limit")
    sub.add_argument("--shard-size", type=shard_gigabytes, default=5.0,
                     help="max GB per safetensors shard (default 5)")
    sub.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    executor_options(sub, "where merged tensors are computed: here (default) or on a Ray cluster")
    add_lowering_arguments(sub)

    sub = command("plan", cmd_plan, "show what a compile would run and reuse, with estimates")
    sub.add_argument("file", type=Path)
    sub.add_argument("--format", choices=("text", "json"), default="text")
    cache_options(sub)
    memory_options(sub, "show the plan even when its estimated peak memory exceeds the limit")

    sub = command("cache", cmd_cache, "list or clear the build cache")
    sub.add_argument("action", choices=("ls", "clear"))
    sub.add_argument("--cache-dir", type=Path, help="the cache (default $CFM_CACHE_DIR, else ~/.cache/cfmlang)")
    sub.add_argument("--format", choices=("text", "json"), default="text")

    sub = command("graph", cmd_graph, "print the dependency graph of a .brick file")
    sub.add_argument("file", type=Path)
    sub.add_argument("--format", choices=("dot", "mermaid", "json"), default="dot")

    sub = command("run", cmd_run, "generate text with a compiled artifact")
    sub.add_argument("directory", type=Path)
    sub.add_argument("--prompt", required=True)
    sub.add_argument("--max-new-tokens", type=int, default=64)
    sub.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    sub.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sub.add_argument("--temperature", type=float, default=0.7)
    sub.add_argument("--top-p", type=float, default=0.9)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--target", choices=("eager",) + PROGRAM_TARGETS, help="which program of the artifact runs "
                     "(default: the lowered one when there is one, else eager)")
    sub.add_argument("--device", help="device to run on (default: the one it was lowered for, or cpu)")
    sub.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)

    sub = command("bench", cmd_bench, "prefill and decode tokens/s of the lowered program against HF eager "
                  "(or against another artifact's lowered program)")
    sub.add_argument("directory", type=Path)
    sub.add_argument("--against", type=Path, help="anchor: another artifact's lowered program (default: HF eager "
                     "on the same weights)")
    sub.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    sub.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    sub.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (default 32)")
    sub.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is kept")
    sub.add_argument("--device", help="device (default: the one the program was lowered for)")
    sub.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)
    sub.add_argument("--format", choices=("text", "json"), default="text")

    sub = command("analyze", cmd_analyze, "find the emergent bricks of a model: sparse activation, "
                  "functional specialization, perturbation and partitions of its FFN neurons")
    sub.add_argument("model", help="FILE.brick (its output), FILE.brick:NODE, or a model directory")
    sub.add_argument("-o", "--output", type=Path, required=True, help="report directory (replaced atomically)")
    sub.add_argument("--probes", type=Path, help="probe directory: one ABILITY.txt per ability, prompts "
                     "separated by `---` lines (default: the shipped seven abilities)")
    sub.add_argument("--max-prompts", type=int, help="use at most this many prompts per ability")
    sub.add_argument("--max-tokens", type=int, default=PROBE_TOKENS, help=f"tokens kept per prompt (default {PROBE_TOKENS})")
    sub.add_argument("--levels", type=_percentages, default=None,
                     help="masked percentages for the loss curves (default 0,10,...,90,95)")
    sub.add_argument("--cett", type=_fractions, default=None, help="CETT targets (default 0.05,0.1,0.2,0.3)")
    sub.add_argument("--eval-per-ability", type=int, default=6,
                     help="prompts per ability for the sparse-activation losses (default 6)")
    sub.add_argument("--cett-tokens", type=int, default=512, help="tokens calibrating the CETT thresholds")
    sub.add_argument("--top", type=float, default=5.0,
                     help="percent of each layer's neurons attributed to an ability (default 5)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the shuffled baseline and random control")
    sub.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward pass")
    sub.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is "
                     "faster on a machine whose cores are already busy)")
    sub.add_argument("--cache-dir", type=Path, help="cache for converted GGUF files (default ~/.cache/cfmlang)")
    sub.add_argument("--format", choices=("text", "json"), default="text",
                     help="json: print the headline numbers and diagnostics as JSON on stdout")
    sub.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    executor_options(sub, "where the forward passes over the prompts run (and a .brick's merges are "
                     "computed): here (default) or, in shards of prompts, on a Ray cluster")

    sub = command("eval", cmd_eval, "score a model on tasks: perplexity (.txt), multiple choice and "
                  "generation (.jsonl), lm-evaluation-harness tasks (.yaml)")
    sub.add_argument("model", help="FILE.brick (its output), FILE.brick:NODE, or an artifact or model directory")
    sub.add_argument("--task", action="append", required=True, metavar="NAME_OR_FILE",
                     help="a task file or a shipped task (facts, arithmetic, prose, facts_harness, counterfact_heldout, "
                          "counterfact_tuning); repeatable")
    sub.add_argument("--limit", type=int, help="items per task (tokens for perplexity; default: all)")
    sub.add_argument("--batch-size", type=int, default=8, help="continuations per forward pass (default 8)")
    sub.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                     help=f"perplexity: window length in tokens (default {DEFAULT_CONTEXT})")
    sub.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                     help=f"perplexity: tokens predicted per window, below --context (default {DEFAULT_STRIDE})")
    sub.add_argument("--max-new-tokens", type=int, default=32,
                     help="generation: tokens per answer when a record gives no max_tokens (default 32)")
    sub.add_argument("--details", action="store_true", help="json: include per-item results")
    sub.add_argument("--cache-dir", type=Path, help="the build cache for FILE.brick targets "
                     "(default $CFM_CACHE_DIR, else ~/.cache/cfmlang)")
    sub.add_argument("--format", choices=("text", "json"), default="text",
                     help="text: a table on stdout; json: the results as JSON on stdout")
    sub.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    sub = command("search", cmd_search, "search the open values of a .brick file (`search(lo, hi)`, `one_of(...)`) "
                  "for the best objective of its `search` statement; resumes a stopped search in the same folder")
    sub.add_argument("file", type=Path)
    sub.add_argument("-o", "--output", type=Path, required=True, help="search folder: the study, trial programs, "
                     "best.brick, its artifact (model/) and the report")
    sub.add_argument("--cache-dir", type=Path, help="the build cache every trial compiles through "
                     "(default $CFM_CACHE_DIR, else ~/.cache/cfmlang)")
    executor_options(sub, "run trials here one at a time (default), or as Ray tasks, one per CPU of the cluster")
    sub.add_argument("--format", choices=("text", "json"), default="text",
                     help="json: print the report (report.json) on stdout")
    sub.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    command("lsp", cmd_lsp, "run the language server over stdio (for editors)")

    sub = command("methods", cmd_methods, "list every method and brick kind with its parameters")
    sub.add_argument("--format", choices=("md",), default="md")

    sub = command("fmt", cmd_fmt, "rewrite .brick files in the canonical layout (comments kept, meaning unchanged)")
    sub.add_argument("files", type=Path, nargs="+", metavar="FILE")
    sub.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file would change")
    sub.add_argument("--diff", action="store_true", help="write nothing; print a unified diff of each change")

    sub = command("import", cmd_import, "translate a mergekit YAML config into a .brick program")
    sub.add_argument("file", type=Path, help="the mergekit config (YAML)")
    sub.add_argument("-o", "--output", type=Path, help="write the .brick file here (default: stdout)")
    sub.add_argument("--force", action="store_true", help="replace an existing output file")
    sub.add_argument("--format", choices=("text", "json"), default="text", help="diagnostics format")
    return parser


def memory_options(sub: argparse.ArgumentParser, forced: str) -> None:
    sub.add_argument("--max-memory", type=size_argument, metavar="SIZE", help="refuse a plan whose "
                     "estimated peak memory exceeds SIZE (500M, 8G ...; default: the available memory)")
    sub.add_argument("--force", action="store_true", help=forced)


MAX_SHARD_GB = 1024.0


def shard_gigabytes(text: str) -> float:
    """A shard size in GB: a finite number above 0 and at most 1024."""
    try:
        size = float(text)
    except ValueError:
        size = float("nan")
    if not 0 < size <= MAX_SHARD_GB:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard size in GB (above 0, at most {MAX_SHARD_GB:g})")
    return size


def size_argument(text: str) -> int:
    from cfmlang.compiler.cache import parse_size

    size = parse_size(text)
    if size is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (500M, 8G, 1T ...)")
    return size


def executor_options(sub: argparse.ArgumentParser, where: str) -> None:
    sub.add_argument("--executor", choices=EXECUTORS, default="local", help=where)
    sub.add_argument("--address", help="with --executor ray: the cluster's address (HOST:PORT or `auto`); "
                     "default: a new local cluster")


def cache_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--cache-dir", type=Path, help="the build cache: node outputs and converted GGUF "
                     "files (default $CFM_CACHE_DIR, else ~/.cache/cfmlang)")
    sub.add_argument("--no-cache", action="store_true", help="neither reuse nor store node outputs: "
                     "stream the whole graph into the output")


def add_lowering_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--target", choices=TARGETS, default="eager",
                     help="also lower the model: a torch.export program, an AOTInductor package, "
                     "TensorRT engines, or a GGUF file (default: eager, weights only)")
    sub.add_argument("--device", default="cpu", help="device the program is lowered for (default cpu)")
    sub.add_argument("--precision", choices=PRECISIONS,
                     help="cast the graph (default: the artifact's dtype; float16 for tensorrt)")
    sub.add_argument("--batch", type=int, default=1, help="tensorrt: static batch size (default 1)")
    sub.add_argument("--prompt-length", type=int, default=128, help="tensorrt: static prompt length (default 128)")
    sub.add_argument("--cache-length", type=int, default=512, help="tensorrt: static KV cache length (default 512)")
    sub.add_argument("--no-fp32-acc", action="store_true", help="tensorrt: float16 matmuls accumulate in float16")
    sub.add_argument("--quant", default="f16", help="gguf: weight type (f32, f16, bf16, q8_0, q5_1, q5_0, "
                     "q4_1, q4_0; default f16)")
    sub.add_argument("--no-pack", action="store_true", help="inductor: keep float32 weights in the decode "
                     "program even where they are exact GGUF block values")
    sub.add_argument("--decode-kernel", choices=DECODE_KERNELS, default="exact",
                     help="inductor: how the decode program multiplies by packed weights: exact (float32 "
                     "rebuilt from the block codes, eager's weights bit for bit; default), bf16 (torch's "
                     "int4 CPU kernels, bfloat16 activations: faster, lossy: SmolLM2's logits move by 0.1 on "
                     "average), bf16x2 (the same with inputs split in two bfloat16 parts: less error, a "
                     "fifth slower)")


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _percentages(text: str) -> tuple[float, ...]:
    return tuple(value / 100 for value in _numbers(text))


def _fractions(text: str) -> tuple[float, ...]:
    return _numbers(text)
