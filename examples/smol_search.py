"""Judge the search of examples/smol_search.brick on data it never saw.

    cfmc search examples/smol_search.brick -o out/smol_search
    python examples/smol_search.py out/smol_search

The search chose its weights by the perplexity of the LoRA bricks' training records
(lora/french.jsonl, lora/pirate.jsonl). This script compiles, from the same program, the
uniform merge (both weights 0.5: the plain average of the two fused models) and each input
(SmolLM2 with the French brick fused, with the pirate brick fused), and scores them and the
search's best artifact (DIR/model) with `cfmc eval` on the held-out records
(lora/french_heldout.jsonl, lora/pirate_heldout.jsonl); the artifacts and each model's
scores (NAME.json) go to DIR_compare beside DIR. The objective on held-out data is
the same sum as the search's: mean NLL per response token on French plus on pirate.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import cfmlang
from cfmlang.api import Input, check_search
from cfmlang.search.text import program_text

EXAMPLES = Path(__file__).resolve().parent
PROGRAM = EXAMPLES / "smol_search.brick"
HELDOUT = [EXAMPLES / "lora" / "french_heldout.jsonl", EXAMPLES / "lora" / "pirate_heldout.jsonl"]


def compile_variant(folder: Path, name: str, values: dict, node: str | None) -> Path:
    """The searched program with `values` written in, compiled (its node `node`, else the
    target) into folder/name; the cache has every input already."""
    source = PROGRAM.read_text()
    text = program_text(source, check_search(PROGRAM), values, [f"{name}: {PROGRAM.name} with {values}"])
    out = folder / name
    cfmlang.compile(Input(text, str(folder / f"{name}.brick"), EXAMPLES), out, node=node)
    return out


def cfmc_eval(model: Path, tasks: list[Path]) -> dict:
    done = subprocess.run([sys.executable, "-m", "cfmlang", "eval", str(model), "--format", "json", "-q",
                           *(f"--task={t}" for t in tasks)], capture_output=True, text=True, check=True)
    return {t["task"]: t["metrics"] for t in json.loads(done.stdout)["tasks"]}


def scored(compare: Path, label: str, folder: Path) -> dict:
    """Held-out metrics of one model, kept in compare/LABEL.json (a rerun reuses them)."""
    kept = compare / f"{label}.json"
    if not kept.is_file():
        held = cfmc_eval(folder, HELDOUT)
        kept.write_text(json.dumps({"model": label, "heldout": held,
                                    "heldout_objective": sum(m["nll"] for m in held.values())}, indent=2) + "\n")
    return json.loads(kept.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("search", type=Path, help="the folder `cfmc search` wrote")
    args = parser.parse_args()
    compare = args.search.parent / f"{args.search.name}_compare"
    compare.mkdir(exist_ok=True)
    names = [d.name for d in check_search(PROGRAM).dimensions]
    uniform = dict.fromkeys(names, 0.5)
    rows = [scored(compare, "uniform", compile_variant(compare, "uniform", uniform, None)),
            scored(compare, "french_input", compile_variant(compare, "french", uniform, "french_smol")),
            scored(compare, "pirate_input", compile_variant(compare, "pirate", uniform, "pirate_smol"))]
    report_file = args.search / "report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        rows.insert(0, scored(compare, "best", args.search / "model"))
        print(f"best values: {report['best']['values']} (trial {report['best']['number']} of "
              f"{len(report['trials'])}; tuning objective {report['best']['value']:.4f})")
    print(f"{'model':<14} {'held-out objective':>18} {'french ppl':>10} {'pirate ppl':>10}")
    for row in rows:
        held = row["heldout"]
        print(f"{row['model']:<14} {row['heldout_objective']:>18.4f} {held['french_heldout']['perplexity']:>10.3f} "
              f"{held['pirate_heldout']['perplexity']:>10.3f}")
    if report_file.is_file():
        best, others = rows[0]["heldout_objective"], [r["heldout_objective"] for r in rows[1:]]
        verdict = "beats" if all(best < other for other in others) else "does NOT beat"
        print(f"held-out: the search's best {verdict} the uniform merge and each input")
    else:
        print(f"{report_file} not written yet: the search has not finished")


if __name__ == "__main__":
    main()
