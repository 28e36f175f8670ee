"""The end of a search: the best program as a plain `.brick` (`best.brick`), its artifact
(`model/`, an ordinary compile of best.brick from the searched file's folder: the node
cache has it already), and the report: `report.json`, `report.md` (the trial table) and
`trials.png` (the objective of each trial and the best so far, against the trial number).
Parameter importances (Optuna's fANOVA) are reported when two or more values are searched
and at least MIN_TRIALS_FOR_IMPORTANCE trials completed."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cfmlang.diagnostics import CompileError, error
from cfmlang.search.driver import write_atomically
from cfmlang.search.text import program_text

MIN_TRIALS_FOR_IMPORTANCE = 4
REPORT_VERSION = 1


@dataclass(frozen=True)
class SearchReport:
    folder: Path
    data: dict

    @property
    def best(self) -> dict:
        return self.data["best"]


def finish(driver) -> SearchReport:
    import optuna

    study, opened, output = driver.study, driver.opened, driver.output
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        errors = sorted({t.user_attrs.get("error", "") for t in study.trials if t.user_attrs.get("error")})
        raise CompileError([error("E266", f"no trial of search `{opened.search.name}` completed", None,
                                  *(f"a trial failed with {e}" for e in errors[:3]),
                                  "see the trial programs in " + str(output / "trials"))])
    best = study.best_trial
    header = [f"The best program of `cfmc search` over {driver.path.name} (search `{opened.search.name}`): "
              f"trial {best.number},",
              f"objective {best.value:.6g} ({opened.search.objective.direction}). Relative paths are those of "
              f"{driver.path.name}:", "compile it from that file's folder."]
    text = program_text(driver.source, opened, best.user_attrs["values"], header)
    write_atomically(output / "best.brick", text)
    build_best(driver, text)
    data = report_data(driver, best)
    write_atomically(output / "report.json", json.dumps(data, indent=2) + "\n")
    write_atomically(output / "report.md", markdown(data))
    plot(data, output / "trials.png")
    return SearchReport(output, data)


def build_best(driver, text: str) -> None:
    from cfmlang.api import Input, compile

    compile(Input(text, str(driver.output / "best.brick"), driver.path.resolve().parent), driver.output / "model",
            cache_dir=driver.settings.cache_dir)


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.trials:
        attrs = t.user_attrs
        if attrs.get("interrupted") or t.state.name.lower() not in ("complete", "fail"):
            continue        # cut off, or queued to run again: not a finished trial
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     "values": attrs.get("values", {}), "metrics": attrs.get("metrics", {}),
                     "compile_seconds": attrs.get("compile_seconds"), "eval_seconds": attrs.get("eval_seconds"),
                     "node": attrs.get("node"), "repeat_of": attrs.get("repeat_of"), "error": attrs.get("error")})
    return rows


def importances(study, opened) -> dict | None:
    import optuna

    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(opened.dimensions) < 2 or len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
        return None
    try:
        found = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):      # every completed trial has the same value
        return None
    return {name: round(float(value), 6) for name, value in found.items()}


def report_data(driver, best) -> dict:
    opened, spec = driver.opened, driver.opened.search
    return {
        "version": REPORT_VERSION, "search": spec.name, "file": str(driver.path), "target": spec.target,
        "objective": {"direction": spec.objective.direction,
                      "tasks": [{"task": t.task, "metric": t.metric, "weight": t.weight} for t in spec.objective.tasks]},
        "budget": spec.budget, "seed": spec.seed, "sampler": spec.sampler,
        "space": [{"name": d.name, "kind": d.kind, **({"choices": list(d.texts)} if d.kind == "choice" else
                                                      {"low": d.low, "high": d.high, "log": d.log})}
                  for d in opened.dimensions],
        "trials": trial_rows(driver.study),
        "best": {"number": best.number, "value": best.value, "values": best.user_attrs["values"],
                 "metrics": best.user_attrs.get("metrics", {})},
        "importances": importances(driver.study, opened),
        "files": {"program": "best.brick", "artifact": "model", "plot": "trials.png", "trials": "trials/"},
    }


def markdown(data: dict) -> str:
    names = [d["name"] for d in data["space"]]
    lines = [f"# Search `{data['search']}` over {Path(data['file']).name}", "",
             f"Target `{data['target']}`; objective: {data['objective']['direction']} "
             + " + ".join(f"{t['weight']:g} x {t['metric'] or 'the headline metric'} of {Path(t['task']).name}"
                          for t in data["objective"]["tasks"]) + f"; sampler {data['sampler']}, seed {data['seed']}, "
             f"budget {data['budget']} trials.", "",
             f"Best: trial {data['best']['number']}, objective {data['best']['value']:.6g}: "
             + ", ".join(f"`{k}` = {v}" for k, v in data["best"]["values"].items()) + ".", "",
             "| trial | objective | " + " | ".join(f"`{n}`" for n in names) + " | compile s | eval s | note |",
             "| ---: | ---: | " + " | ".join("---:" for _ in names) + " | ---: | ---: | --- |"]
    for row in data["trials"]:
        value = "" if row["value"] is None else f"{row['value']:.6g}"
        note = (f"same values as trial {row['repeat_of']}" if row["repeat_of"] is not None else
                row["error"] or row["state"] if row["state"] != "complete" else
                f"node {row['node'][:8]}" if row["node"] else "")
        seconds = [("" if row[k] is None else f"{row[k]:.1f}") for k in ("compile_seconds", "eval_seconds")]
        lines.append(f"| {row['number']} | {value} | " + " | ".join(str(row["values"].get(n, "")) for n in names)
                     + f" | {seconds[0]} | {seconds[1]} | {note} |")
    if data["importances"]:
        lines += ["", "Parameter importances (Optuna fANOVA, sum 1):", ""]
        lines += [f"- `{name}`: {value:.3f}" for name, value in data["importances"].items()]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in data["trials"] if r["value"] is not None]
    numbers, values = [r["number"] for r in done], [r["value"] for r in done]
    pick = min if data["objective"]["direction"] == "minimize" else max
    best = [pick(values[:i + 1]) for i in range(len(values))]
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    axes.scatter(numbers, values, s=18, label="trial")
    axes.step(numbers, best, where="post", color="tab:orange", label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel(f"objective ({data['objective']['direction']})")
    axes.set_title(f"search `{data['search']}`")
    axes.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    shutil.move(tmp, path)
