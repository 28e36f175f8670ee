"""The `cfmc` commands: each calls the public API and prints its result."""
from __future__ import annotations

import sys
import time

from cfmlang.cli.progress import ProgressBar, StageLog, TrainingBar, short_value
from cfmlang.diagnostics import render_json, render_plain

EXIT_OK, EXIT_USER, EXIT_INTERNAL = 0, 1, 2


def report(diagnostics, args) -> None:
    if getattr(args, "format", "text") == "json":
        print(render_json(diagnostics))
    elif diagnostics:
        print(render_plain(diagnostics), file=sys.stderr)


def lowering_options(args):
    from cfmlang.compiler.lower import LowerOptions

    return LowerOptions(target=args.target, device=args.device, precision=args.precision, batch=args.batch,
                        prompt_length=args.prompt_length, cache_length=args.cache_length,
                        use_fp32_acc=not args.no_fp32_acc, pack_weights=not args.no_pack,
                        decode_kernel=args.decode_kernel, quant=args.quant)


def cmd_check(args) -> int:
    from cfmlang.api import check_search
    from cfmlang.compiler.graph import build_graph

    checked = check_search(args.file)
    program = checked.checked
    _, dropped = build_graph(program)
    report(program.warnings + tuple(dropped), args)
    if args.format == "text":
        for line in family_lines(program):
            print(line, file=sys.stderr)
        searched = (f"; search `{checked.search.name}` over {len(checked.dimensions)} value(s)"
                    if checked.search else "")
        print(f"{args.file}: ok ({len(program.nodes)} nodes{searched})", file=sys.stderr)
    return EXIT_OK


def family_lines(program) -> list[str]:
    """`model base: llama (transformers LlamaForCausalLM), 30 layers` for every model the
    program reads from a source (a model node that depends on no other node)."""
    from cfmlang.compiler.ir import NodeKind

    lines = []
    for node in program.nodes:
        if node.node_type != NodeKind.MODEL or node.deps or node.arch is None:
            continue
        layout = node.arch.layout
        family = (f"{layout.model_type} (transformers {layout.causal_lm})" if layout is not None
                  else f"{node.arch.model_type} (a family cfmlang cannot describe: merges without gradients only)")
        lines.append(f"model {node.name}: {family}, {node.arch.num_layers} layers")
    return lines


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

    shown = not args.quiet and args.format == "text"
    beat = args.heartbeat
    with ProgressBar(enabled=shown) as bar, \
            TrainingBar(enabled=shown, log=_quiet_or(args, beat.log)) as training:
        def progress(done: int, total: int) -> None:
            bar.update(done, total)
            beat.note(f"writing the output: {done / 1e6:.1f} of {total / 1e6:.1f} MB")

        def warn(diagnostics) -> None:      # printed before the work they concern (json: in the summary)
            if args.format == "text":
                beat.log(render_plain(diagnostics), doing=f"compiling {args.file}")
        result = compile(args.file, args.output, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                         force=args.force, max_memory=args.max_memory, max_shard_bytes=int(args.shard_size * 1024**3),
                         progress=progress, log=_quiet_or(args, beat.log), on_train_step=training.step,
                         lowering=lowering_options(args), executor=args.executor, address=args.address,
                         warn=warn)
    artifact = result.manifest["artifact"]
    counts = {status: [n.name for n in result.plan.nodes if n.status == status] for status in ("run", "read", "cached")}
    if args.format == "json":
        import json
        print(json.dumps({"output": str(args.output), **artifact, "lowered": result.manifest.get("lowered"),
                          "ran": counts["run"], "read": counts["read"], "cached": counts["cached"],
                          "diagnostics": [d.to_json() for d in result.warnings]}, indent=2))
        return EXIT_OK
    if not args.quiet:
        linked = " (linked from the cache)" if result.plan.node(result.plan.output).status == "cached" else ""
        print(f"wrote {args.output}: {artifact['tensors']} tensors, "
              f"{artifact['bytes'] / 1e6:.1f} MB in {len(artifact['files'])} file(s){linked}; "
              f"{len(counts['run'])} node(s) run, {len(counts['read'])} source(s) read, "
              f"{len(counts['cached'])} from the cache", file=sys.stderr)
    return EXIT_OK


def _quiet_or(args, log):
    return (lambda msg: None) if args.quiet else log


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


def cmd_run(args) -> int:
    from cfmlang.runtime.run import generate

    generate(args.directory, args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
             sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
             stream=sys.stdout, target=args.target, device=args.device, trust_code=args.trust_code)
    return EXIT_OK


def cmd_bench(args) -> int:
    import json

    from cfmlang.runtime.bench import bench, render_table

    args.heartbeat.note(f"benchmarking {args.directory}")
    result = bench(args.directory, batches=args.batch, prompt_tokens=args.prompt_tokens,
                   new_tokens=args.new_tokens, repeat=args.repeat, device=args.device, against=args.against,
                   trust_code=args.trust_code)
    if result["load"]["busy"]:
        report([busy_machine(result["load"])], None)     # on stderr, whatever the format
    print(json.dumps(result, indent=2) if args.format == "json" else render_table(result))
    return EXIT_OK


def busy_machine(load: dict):
    from cfmlang.diagnostics import warning

    return warning("W200", f"the machine was busy while benchmarking: load average {load['load_1min']:.2f} on "
                   f"{load['cores']} cores", None,
                   "other processes shared the cores, so the ratios are not this machine's; rerun when it is idle")


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
    log = (lambda msg: None) if args.quiet else args.heartbeat.log
    progress = StageLog(sys.stderr, enabled=not args.quiet, say=args.heartbeat.log)
    run = analyze_model(args.model, args.output, probes_dir=args.probes, settings=settings,
                        max_prompts=args.max_prompts, max_tokens=args.max_tokens, cache_dir=args.cache_dir,
                        progress=progress, log=log, executor=args.executor, address=args.address)
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
            print(f"  {key}: {short_value(value)}", file=sys.stderr)
    return EXIT_OK


def cmd_eval(args) -> int:
    from cfmlang.analysis.target import open_model, parse_spec
    from cfmlang.eval import Settings, evaluate, load_task
    from cfmlang.eval.report import render_json, render_table

    settings = Settings(limit=args.limit, batch_size=args.batch_size, context=args.context, stride=args.stride,
                        max_new_tokens=args.max_new_tokens)
    tasks = [load_task(name) for name in args.task]
    spec = parse_spec(args.model)
    log = (lambda msg: None) if args.quiet else args.heartbeat.log
    progress = StageLog(sys.stderr, enabled=not args.quiet, say=args.heartbeat.log)
    with open_model(spec, cache_dir=args.cache_dir, log=log) as loaded:
        result = evaluate(loaded.model, loaded.tokenizer, tasks, settings, title=loaded.title,
                          progress=progress.stage)
    progress.close()
    sys.stdout.write(render_json(result, args.details) + "\n" if args.format == "json" else render_table(result))
    return EXIT_OK


def cmd_search(args) -> int:
    import json

    from cfmlang.compiler.executors import executor_named
    from cfmlang.search.driver import Interrupted
    from cfmlang.search.study import SearchSettings, search

    executor_named(args.executor, args.address)    # E243, E240 before anything runs
    progress = (lambda line: None) if args.quiet else args.heartbeat.log
    settings = SearchSettings(cache_dir=args.cache_dir, executor=args.executor, address=args.address,
                              progress=progress)
    try:
        result = search(args.file, args.output, settings)
    except Interrupted as stop:
        print(f"stopped after {stop.finished} of {stop.budget} trials; they are stored in {args.output}: "
              "run the same command again to resume", file=sys.stderr)
        return 128 + getattr(stop.cause, "number", 2)
    if args.format == "json":
        print(json.dumps(result.data, indent=2))
    elif not args.quiet:
        best = result.best
        chosen = ", ".join(f"{name}={value}" for name, value in best["values"].items())
        print(f"best: trial {best['number']}, objective {best['value']:.6g}; {chosen}\n"
              f"wrote {args.output}/best.brick, {args.output}/model, {args.output}/report.md "
              f"(+ report.json, trials.png)", file=sys.stderr)
    return EXIT_OK


def cmd_methods(args) -> int:
    from cfmlang.ops.catalogue import methods_markdown

    sys.stdout.write(methods_markdown() + "\n")
    return EXIT_OK


def cmd_lsp(args) -> int:
    from cfmlang.diagnostics import CompileError, error

    try:
        from cfmlang.lsp.server import serve_stdio
    except ImportError as exc:
        raise CompileError([error("E217", f"`cfmc lsp` needs the language server packages ({exc.name} is "
                                  "not installed)", None, "pip install 'cfmlang[lsp]' (or pip install pygls)")]) from None
    serve_stdio()
    return EXIT_OK


def cmd_import(args) -> int:
    from cfmlang.importers.mergekit import import_file

    text = import_file(args.file, args.output, force=args.force)
    if args.output is None:
        sys.stdout.write(text)
    else:
        print(f"wrote {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_fmt(args) -> int:
    """Format each file in place (atomically); `--check` and `--diff` write nothing."""
    import difflib
    import os
    from pathlib import Path

    from cfmlang.diagnostics import CompileError, error
    from cfmlang.frontend.format import format_source
    from cfmlang.frontend.resolve import read_source

    problems, changed = [], []
    for path in args.files:
        if not Path(path).is_file():
            problems.append(error("E040", f"cannot read `{path}`: no such file", None, "check the path"))
            continue
        try:
            text = read_source(path, str(path))
            formatted = format_source(text, str(path))
        except CompileError as exc:
            problems += exc.diagnostics
            continue
        if formatted == text:
            continue
        changed.append(path)
        if args.diff:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), formatted.splitlines(True),
                                                       f"{path}", f"{path} (formatted)"))
        if args.check:
            print(f"would reformat {path}", file=sys.stderr)
        elif not args.diff:
            tmp = Path(path).with_name(f".{Path(path).name}.fmt-{os.getpid()}")
            try:
                tmp.write_text(formatted, encoding="utf-8")
                os.chmod(tmp, os.stat(path).st_mode & 0o7777)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            print(f"reformatted {path}", file=sys.stderr)
    if problems:
        raise CompileError(problems)
    return EXIT_USER if args.check and changed else EXIT_OK
