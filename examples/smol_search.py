"""Judge the search of examples/smol_search.brick on data it never saw.

    cfmc search examples/smol_search.brick -o out/smol_search
    python examples/smol_search.py out/smol_search

The search chose its weights by the perplexity of the LoRA bricks' training records
(lora/french.jsonl, lora/pirate.jsonl). This script compiles, from the same program, the
uniform merge (both weights 0.5: the plain average of the two fused models) and each input
(SmolLM2 with the French brick fused, with the pirate brick fused), and scores them and the
search's best artifact (DIR/model) with `cfmc eval` on the held-out records
(lora/french_heldout.jsonl, lora/pirate_heldout.jsonl); they and compare.json go to
DIR_compare beside DIR. The objective on held-out data is
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
TUNING = [EXAMPLES / "lora" / "french.jsonl", EXAMPLES / "lora" / "pirate.jsonl"]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("search", type=Path, help="the folder `cfmc search` wrote")
    args = parser.parse_args()
    report = json.loads((args.search / "report.json").read_text())
    names = [d["name"] for d in report["space"]]
    compare = args.search.parent / f"{args.search.name}_compare"
    compare.mkdir(exist_ok=True)
    models = {"best (search)": args.search / "model",
              "uniform merge": compile_variant(compare, "uniform", dict.fromkeys(names, 0.5), None),
              "french input": compile_variant(compare, "french", dict.fromkeys(names, 0.5), "french_smol"),
              "pirate input": compile_variant(compare, "pirate", dict.fromkeys(names, 0.5), "pirate_smol")}
    rows = []
    for label, folder in models.items():
        held, tune = cfmc_eval(folder, HELDOUT), cfmc_eval(folder, TUNING)
        rows.append({"model": label, "heldout": held, "tuning": tune,
                     "heldout_objective": sum(m["nll"] for m in held.values()),
                     "tuning_objective": sum(m["nll"] for m in tune.values())})
    print(f"best values: {report['best']['values']} (trial {report['best']['number']} of {len(report['trials'])})")
    print(f"{'model':<16} {'tuning obj':>10} {'held-out obj':>12} {'fr ppl':>8} {'pirate ppl':>10}")
    for row in rows:
        held = row["heldout"]
        print(f"{row['model']:<16} {row['tuning_objective']:>10.4f} {row['heldout_objective']:>12.4f} "
              f"{held['french_heldout']['perplexity']:>8.3f} {held['pirate_heldout']['perplexity']:>10.3f}")
    (compare / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    best, others = rows[0]["heldout_objective"], [r["heldout_objective"] for r in rows[1:]]
    verdict = "beats" if all(best < other for other in others) else "does NOT beat"
    print(f"held-out: the search's best {verdict} the uniform merge and each input")


if __name__ == "__main__":
    main()
