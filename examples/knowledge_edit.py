"""Compile a knowledge-edit example and print what the edit did, against the bar of
issue 6: at least 8 of 10 facts completed with the new target by greedy decoding, and at
least 90% of the unrelated prompts' greedy completions unchanged.

    python examples/knowledge_edit.py examples/rome_smol.brick [-o out/rome_smol]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cfmlang
from cfmlang.ops.update.report import render

FACTS_BAR, UNCHANGED_BAR = 0.8, 0.9


def edit(brick: Path, output: Path, **compile_options) -> dict:
    """Compile `brick` into `output`; return the edit report of its output node."""
    result = cfmlang.compile(brick, output, log=lambda msg: None, **compile_options)
    return result.manifest["nodes"][result.manifest["output"]]["report"]


def verdict(summary: dict) -> tuple[bool, str]:
    ok = summary["efficacy"] >= FACTS_BAR and summary["specificity"] >= UNCHANGED_BAR
    return ok, (f"facts completed with the new target: {summary['efficacy']:.0%} (bar {FACTS_BAR:.0%}); "
                f"unrelated completions unchanged: {summary['specificity']:.0%} (bar {UNCHANGED_BAR:.0%}) "
                f"-> {'PASS' if ok else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("brick", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="artifact directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        report = edit(args.brick, args.output or Path(scratch) / "edited")
    print(render(report))
    ok, line = verdict(report["summary"])
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
