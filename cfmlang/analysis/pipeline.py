"""`cfmc analyze`: open the model, read the probes, run the analysis, write the report."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cfmlang.analysis.probes import read_probes, tokenize
from cfmlang.analysis.report import refuse_foreign_output, require_matplotlib, write_files
from cfmlang.analysis.run import DEFAULTS, SILENT, Analysis, Progress, Settings, analyze
from cfmlang.analysis.shards import shards_named
from cfmlang.analysis.target import open_model, parse_spec
from cfmlang.artifact.write import atomic_directory
from cfmlang.diagnostics import CompileError, Diagnostic, error


@dataclass(frozen=True)
class AnalysisRun:
    analysis: Analysis
    output_dir: Path
    warnings: tuple[Diagnostic, ...]


def analyze_model(model: str, output_dir, *, probes_dir=None, settings: Settings = DEFAULTS,
                  max_prompts: int | None = None, max_tokens: int = 128, cache_dir=None,
                  progress: Progress = SILENT, log=lambda msg: None, executor: str = "local",
                  address: str | None = None) -> AnalysisRun:
    """Analyse MODEL (FILE.brick, FILE.brick:NODE or a model directory) with the probe set
    in `probes_dir` (the shipped one by default; at most `max_prompts` per ability) and
    write the report into `output_dir`
    atomically. Every user error is a CompileError raised before any weight is read.
    `executor="ray"` runs the forward passes over the prompts (and the compile of a
    .brick's merges) on the Ray cluster at `address`; the report is the same."""
    output_dir = Path(output_dir)
    shards = shards_named(executor, address)
    problems = settings.problems()
    if max_tokens < 2:
        problems.append(error("E163", "invalid analysis setting: --max-tokens must be at least 2", None,
                              "prompts need a next token to predict"))
    if max_prompts is not None and max_prompts < 2:
        problems.append(error("E163", "invalid analysis setting: --max-prompts must be at least 2", None,
                              "average precision needs several prompts per ability"))
    if problems:
        raise CompileError(problems)
    require_matplotlib()
    refuse_foreign_output(output_dir)
    spec = parse_spec(str(model))
    texts, warnings = read_probes(probes_dir)
    texts = texts.limited(max_prompts)
    with open_model(spec, cache_dir, log, executor, address) as loaded:
        probes, notes = tokenize(texts, loaded.tokenizer, max_tokens)
        warnings += notes
        try:
            analysis = analyze(loaded.model, probes, settings, progress, shards)
        finally:
            shards.finish(log)
    analysis.report["model"]["title"] = loaded.title
    analysis.report["probes"]["source"] = texts.source
    try:
        with atomic_directory(output_dir) as folder:
            write_files(folder, analysis, loaded.title)
    except OSError as exc:
        raise CompileError([error("E081", f"cannot write the report: {exc}", None,
                                  "check free disk space and permissions; nothing was written")]) from None
    return AnalysisRun(analysis, output_dir, tuple(warnings))
