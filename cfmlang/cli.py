"""`cfmc`: the command line. Thin: every command calls the public API.

Exit codes: 0 ok, 1 user error (diagnostics printed), 2 internal error.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from cfmlang.artifact.write import InterruptedAfterWrite
from cfmlang.compiler.lower import PRECISIONS, TARGETS
from cfmlang.diagnostics import CompileError, render_json, render_plain
from cfmlang.analysis.probes import PROBE_TOKENS

EXIT_OK, EXIT_USER, EXIT_INTERNAL = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CompileError as exc:
        report(exc.diagnostics, args)
        return EXIT_USER
    except InterruptedAfterWrite as exc:
        print(f"interrupted after {exc.target} was written in full", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: never show a traceback by default
        if getattr(args, "debug", False):
            traceback.print_exc()
        else:
            print(f"internal error: {type(exc).__name__}: {exc}\n"
                  "This is a bug in cfmlang. Please report it with the command you ran; "
                  "rerun with --debug for the traceback.", file=sys.stderr)
        return EXIT_INTERNAL


def report(diagnostics, args) -> None:
    if getattr(args, "format", "text") == "json":
        print(render_json(diagnostics))
    elif diagnostics:
        print(render_plain(diagnostics), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfmc", description="compile configurable foundation models")
    parser.add_argument("--version", action="version", version=f"cfmc {__import__('cfmlang').__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
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
    sub.add_argument("--shard-size", type=float, default=5.0, help="max GB per safetensors shard (default 5)")
    sub.add_argument("-q", "--quiet", action="store_true", help="no progress output")
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
    sub.add_argument("--target", choices=TARGETS, help="which program of the artifact runs "
                     "(default: the lowered one when there is one, else eager)")
    sub.add_argument("--device", help="device to run on (default: the one it was lowered for, or cpu)")

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

    sub = command("methods", cmd_methods, "list every method and brick kind with its parameters")
    sub.add_argument("--format", choices=("md",), default="md")

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


def size_argument(text: str) -> int:
    from cfmlang.compiler.cache import parse_size

    size = parse_size(text)
    if size is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (500M, 8G, 1T ...)")
    return size


def cache_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--cache-dir", type=Path, help="the build cache: node outputs and converted GGUF "
                     "files (default $CFM_CACHE_DIR, else ~/.cache/cfmlang)")
    sub.add_argument("--no-cache", action="store_true", help="neither reuse nor store node outputs: "
                     "stream the whole graph into the output")


def add_lowering_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--target", choices=TARGETS, default="eager",
                     help="also lower the model: a torch.export program, an AOTInductor package, "
                     "or TensorRT engines (default: eager, weights only)")
    sub.add_argument("--device", default="cpu", help="device the program is lowered for (default cpu)")
    sub.add_argument("--precision", choices=PRECISIONS,
                     help="cast the graph (default: the artifact's dtype; float16 for tensorrt)")
    sub.add_argument("--batch", type=int, default=1, help="tensorrt: static batch size (default 1)")
    sub.add_argument("--prompt-length", type=int, default=128, help="tensorrt: static prompt length (default 128)")
    sub.add_argument("--cache-length", type=int, default=512, help="tensorrt: static KV cache length (default 512)")
    sub.add_argument("--no-fp32-acc", action="store_true", help="tensorrt: float16 matmuls accumulate in float16")
    sub.add_argument("--no-pack", action="store_true", help="inductor: keep float32 weights in the decode "
                     "program even where they are exact GGUF block values")


def lowering_options(args):
    from cfmlang.compiler.lower import LowerOptions

    return LowerOptions(target=args.target, device=args.device, precision=args.precision, batch=args.batch,
                        prompt_length=args.prompt_length, cache_length=args.cache_length,
                        use_fp32_acc=not args.no_fp32_acc, pack_weights=not args.no_pack)


def cmd_check(args) -> int:
    from cfmlang.api import check
    from cfmlang.compiler.graph import build_graph

    program = check(args.file)
    _, dropped = build_graph(program)
    report(program.warnings + tuple(dropped), args)
    if args.format == "text":
        print(f"{args.file}: ok ({len(program.nodes)} nodes)", file=sys.stderr)
    return EXIT_OK


def cmd_graph(args) -> int:
    from cfmlang.api import check
    from cfmlang.compiler.graph import build_graph, to_dot, to_json, to_mermaid

    graph, dropped = build_graph(check(args.file))
    if dropped:
        print(render_plain(dropped), file=sys.stderr)
    render = {"dot": to_dot, "mermaid": to_mermaid, "json": to_json}[args.format]
    sys.stdout.write(render(graph))
    return EXIT_OK


def cmd_compile(args) -> int:
    from cfmlang.api import compile

    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    with ProgressBar(enabled=not args.quiet and args.format == "text") as bar, \
            TrainingBar(enabled=not args.quiet and args.format == "text", log=log) as training:
        result = compile(args.file, args.output, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                         force=args.force, max_memory=args.max_memory, max_shard_bytes=int(args.shard_size * 1024**3),
                         progress=bar.update, log=log, on_train_step=training.step,
                         lowering=lowering_options(args))
    artifact = result.manifest["artifact"]
    ran = [n.name for n in result.plan.nodes if n.status == "run"]
    cached = [n.name for n in result.plan.nodes if n.status == "cached"]
    if args.format == "json":
        import json
        print(json.dumps({"output": str(args.output), **artifact, "lowered": result.manifest.get("lowered"), "ran": ran, "cached": cached,
                          "diagnostics": [d.to_json() for d in result.warnings]}, indent=2))
        return EXIT_OK
    report(result.warnings, args)
    if not args.quiet:
        print(f"wrote {args.output}: {artifact['tensors']} tensors, "
              f"{artifact['bytes'] / 1e6:.1f} MB in {len(artifact['files'])} file(s); "
              f"ran {len(ran)} node(s), {len(cached)} from the cache", file=sys.stderr)
    return EXIT_OK


def cmd_plan(args) -> int:
    from cfmlang.api import plan
    from cfmlang.compiler.plan import plan_json, plan_table

    build_plan = plan(args.file, cache_dir=args.cache_dir, use_cache=not args.no_cache, force=args.force,
                      max_memory=args.max_memory)
    if args.format == "json":
        import json
        print(json.dumps(plan_json(build_plan), indent=2))
    else:
        sys.stdout.write(plan_table(build_plan))
    return EXIT_OK


def cmd_cache(args) -> int:
    from cfmlang.compiler.cache import Cache
    from cfmlang.compiler.plan import human

    cache = Cache(args.cache_dir)
    if args.action == "clear":
        freed = cache.clear()
        print(f"cleared {cache.root} ({human(freed)} freed)", file=sys.stderr)
        return EXIT_OK
    entries = cache.entries()
    if args.format == "json":
        import json
        print(json.dumps({"root": str(cache.root), "limit": cache.limit, "entries": [
            {"category": e.category, "name": e.name, "bytes": e.bytes, "last_used": e.last_used,
             "what": e.what} for e in entries]}, indent=2))
        return EXIT_OK
    for e in sorted(entries, key=lambda e: -e.last_used):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(f"{e.category}/{e.name[:16]}  {human(e.bytes):>10}  {used}  {e.what}")
    total = sum(e.bytes for e in entries)
    print(f"{len(entries)} entries, {human(total)} of {human(cache.limit)} in {cache.root}")
    return EXIT_OK


class ProgressBar:
    """A rich progress bar over output bytes, drawn on stderr when it is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.progress = self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
            )

            self.progress = Progress("[bold]writing", BarColumn(), DownloadColumn(),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("write", total=None)
        return self

    def update(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False


class TrainingBar:
    """A bar per training brick with its loss on a terminal; otherwise a log line every
    tenth of the steps."""

    def __init__(self, enabled: bool, log):
        self.live = enabled and sys.stderr.isatty()
        self.log = log
        self.progress = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]training {task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                                     TimeRemainingColumn(), console=Console(stderr=True))
            self.progress.__enter__()
        return self

    def step(self, name: str, step: int, steps: int, loss: float) -> None:
        if self.progress is None:
            if step == steps or step % max(1, steps // 10) == 0:
                self.log(f"training {name}: step {step}/{steps}, loss {loss:.4f}")
            return
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=steps, loss=loss)
        self.progress.update(self.tasks[name], completed=step, loss=loss)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False


def cmd_run(args) -> int:
    from cfmlang.runtime.run import generate

    generate(args.directory, args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
             sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
             stream=sys.stdout, target=args.target, device=args.device)
    return EXIT_OK


def cmd_bench(args) -> int:
    import json

    from cfmlang.runtime.bench import bench, render_table

    result = bench(args.directory, batches=args.batch, prompt_tokens=args.prompt_tokens,
                   new_tokens=args.new_tokens, repeat=args.repeat, device=args.device, against=args.against)
    print(json.dumps(result, indent=2) if args.format == "json" else render_table(result))
    return EXIT_OK


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _percentages(text: str) -> tuple[float, ...]:
    return tuple(value / 100 for value in _numbers(text))


def _fractions(text: str) -> tuple[float, ...]:
    return _numbers(text)


def cmd_analyze(args) -> int:
    import json

    from cfmlang.analysis import Settings, analyze_model
    from cfmlang.analysis.run import DEFAULT_CETT_TARGETS, DEFAULT_LEVELS

    settings = Settings(levels=args.levels or DEFAULT_LEVELS, cett_targets=args.cett or DEFAULT_CETT_TARGETS,
                        eval_per_ability=args.eval_per_ability, cett_tokens=args.cett_tokens,
                        top_fraction=args.top / 100, seed=args.seed, max_batch_tokens=args.batch_tokens)
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    progress = StageLog(sys.stderr, enabled=not args.quiet)
    run = analyze_model(args.model, args.output, probes_dir=args.probes, settings=settings,
                        max_prompts=args.max_prompts, max_tokens=args.max_tokens, cache_dir=args.cache_dir, progress=progress, log=log)
    progress.close()
    headline = run.analysis.report["headline"]
    if args.format == "json":
        print(json.dumps({"output": str(args.output), "headline": headline,
                          "diagnostics": [d.to_json() for d in run.warnings]}, indent=2))
        return EXIT_OK
    report(run.warnings, args)
    if not args.quiet:
        print(f"wrote {args.output}/report.html and analysis.json", file=sys.stderr)
        for key, value in headline.items():
            print(f"  {key}: {_short(value)}", file=sys.stderr)
    return EXIT_OK


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_short(v)}" for k, v in value.items())
    return str(value)


class StageLog:
    """Progress of the analysis stages on stderr: a live counter on a terminal, else a
    line per stage and per quarter of it."""

    def __init__(self, stream, enabled: bool):
        self.stream, self.enabled = stream, enabled
        self.live = enabled and stream.isatty()
        self.open = False

    def stage(self, title: str, steps: int):
        import time

        self.close()
        state = {"done": 0, "start": time.monotonic()}
        self.open = self.enabled
        if self.enabled and not self.live:
            print(f"{title}: {steps} steps", file=self.stream, flush=True)

        def tick():
            state["done"] += 1
            done, elapsed = state["done"], time.monotonic() - state["start"]
            if self.live:
                end = "\n" if done >= steps else ""
                print(f"\r{title}: {done}/{steps} ({elapsed:.0f} s)", end=end, file=self.stream, flush=True)
            elif self.enabled and done * 4 // max(steps, 1) != (done - 1) * 4 // max(steps, 1):
                print(f"  {done}/{steps} ({elapsed:.0f} s)", file=self.stream, flush=True)
            self.open = done < steps and self.live
        return tick

    def close(self):
        if self.open:
            print(file=self.stream, flush=True)
        self.open = False


def cmd_methods(args) -> int:
    from cfmlang.ops.catalogue import methods_markdown

    sys.stdout.write(methods_markdown() + "\n")
    return EXIT_OK


def cmd_import(args) -> int:
    from cfmlang.importers.mergekit import import_file

    text = import_file(args.file, args.output, force=args.force)
    if args.output is None:
        sys.stdout.write(text)
    else:
        print(f"wrote {args.output}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
