"""Writing an analysis: analysis.json (every number), func_scores.safetensors, PNG plots,
and report.html, one page embedding the plots. Written atomically into one directory."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from cfmlang.analysis.run import Analysis
from cfmlang.diagnostics import CompileError, error

MARKER = "analysis.json"
PLOTS = ("sparse_activation", "cett", "funcscore", "perturbation", "partitions")


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise CompileError([error("E164", "the analysis report needs matplotlib, which is not installed",
                                  None, "pip install 'cfmlang[analyze]' (or pip install matplotlib)")]) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def refuse_foreign_output(output_dir: Path) -> None:
    """Only an earlier analysis (or nothing) may be replaced."""
    if output_dir.is_symlink() or not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise CompileError([error("E082", f"refusing to write {output_dir}: it is a file", None,
                                  "choose another output path")])
    if any(output_dir.iterdir()) and not (output_dir / MARKER).is_file():
        raise CompileError([error("E082", f"refusing to replace {output_dir}: it is a non-empty "
                                  "directory that is not a cfmc analysis", None,
                                  "choose a new output path; cfmc analyze only replaces its own reports")])


def write_files(folder: Path, analysis: Analysis, title: str) -> None:
    from safetensors.torch import save_file

    plt = require_matplotlib()
    report = analysis.report
    (folder / MARKER).write_text(json.dumps(report, indent=1) + "\n")
    save_file({"func_scores": analysis.scores.contiguous(), "baseline": analysis.baseline_scores.contiguous()},
              folder / "func_scores.safetensors",
              metadata={"abilities": json.dumps(report["probes"]["abilities"]),
                        "layout": "[layers, neurons, abilities]"})
    for name in PLOTS:
        figure = PLOTTERS[name](plt, report)
        figure.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
    (folder / "report.html").write_text(render_html(folder, report, title))


def plot_sparse(plt, report):
    sparse = report["sparse_activation"]
    figure, axis = plt.subplots(figsize=(6, 4))
    percent = [100 * f for f in sparse["levels"]]
    for kind, label in (("activation", "activation magnitude |a_i|"),
                        ("output", "output magnitude |a_i|·||W_down[:,i]||")):
        axis.plot(percent, sparse["loss"][kind], marker="o", label=label)
    axis.axhline(sparse["dense_loss"], color="grey", linestyle="--", label="dense")
    axis.set(xlabel="neurons masked per token and layer (%)", ylabel="LM loss (nats/token)",
             title="Sparse activation: loss vs masked neurons")
    axis.legend()
    return figure


def plot_cett(plt, report):
    figure, axis = plt.subplots(figsize=(6, 4))
    for entry in report["sparse_activation"]["cett"]:
        axis.plot([100 * s for s in entry["sparsity"]], marker=".",
                  label=f"CETT {entry['target']:g}: loss {entry['loss']:.3f}")
    axis.set(xlabel="layer", ylabel="neurons masked (%)", title="CETT-based sparsity per layer")
    axis.legend()
    return figure


def plot_funcscore(plt, report):
    functional = report["functional"]
    figure, axis = plt.subplots(figsize=(6, 4))
    names = {"best": "best", "top_permille": f"{report['settings']['permille']:g}‰-best", "mean": "mean"}
    for index, (key, label) in enumerate(names.items()):
        color = f"C{index}"
        axis.plot(functional["mean_over_abilities"][key], color=color, label=label)
        axis.plot(functional["baseline_mean_over_abilities"][key], color=color, linestyle="--",
                  label=f"{label} (shuffled labels)")
    axis.set(xlabel="layer", ylabel="FuncScore (AP), mean over abilities",
             title="Functional specialization per layer")
    axis.legend(fontsize="small")
    return figure


def heatmap(plt, matrix, abilities, title, colorbar, fmt):
    figure, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(matrix, cmap="viridis")
    axis.set_xticks(range(len(abilities)), abilities, rotation=45, ha="right")
    axis.set_yticks(range(len(abilities)), abilities)
    for row, values in enumerate(matrix):
        for col, value in enumerate(values):
            axis.text(col, row, fmt.format(value), ha="center", va="center", color="white", fontsize=8)
    figure.colorbar(image, ax=axis, label=colorbar)
    axis.set_title(title)
    return figure, axis


def plot_perturbation(plt, report):
    matrix = [[100 * v for v in row] for row in report["perturbation"]["relative_increase"]]
    figure, axis = heatmap(plt, matrix, report["probes"]["abilities"],
                           "Perplexity increase (%) when an ability's top "
                           f"{100 * report['settings']['top_fraction']:g}% neurons are zeroed",
                           "relative perplexity increase (%)", "{:.1f}")
    axis.set(xlabel="measured ability", ylabel="zeroed ability's neurons")
    return figure


def plot_partitions(plt, report):
    partitions = report["partitions"]
    figure, _ = heatmap(plt, partitions["overlap"], report["probes"]["abilities"],
                           f"Overlap of top neuron sets (chance {partitions['chance_overlap']:.3f})",
                           "|S_f ∩ S_g| / |S_f|", "{:.2f}")
    return figure


PLOTTERS = {"sparse_activation": plot_sparse, "cett": plot_cett, "funcscore": plot_funcscore,
            "perturbation": plot_perturbation, "partitions": plot_partitions}


def render_html(folder: Path, report: dict, title: str) -> str:
    facts = report["headline"]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in facts.items())
    abilities = report["probes"]["abilities"]
    probe_rows = "".join(f"<tr><th>{html.escape(a)}</th><td>{n}</td><td>{t}</td></tr>" for a, n, t in
                         zip(abilities, report["probes"]["prompts"], report["probes"]["tokens"]))
    model = report["model"]
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode((folder / f"{name}.png").read_bytes()).decode()}"></figure>' for name in PLOTS)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cfmc analyze: {html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1250px;margin:1em auto}}figure{{display:inline-block;margin:4px}}
img{{width:600px}}table{{border-collapse:collapse;font-size:13px}}th,td{{border:1px solid #ccc;padding:2px 6px;text-align:left}}</style>
</head><body>
<h1>Emergent bricks of {html.escape(title)}</h1>
<p>{html.escape(model['class'])}: {model['layers']} layers, {model['neurons_per_layer']} FFN neurons per layer.
Probe set: {html.escape(report['probes'].get('source', ''))}. The analysis of §4 of <i>Configurable Foundation
Models</i> (arXiv 2409.02877): sparse activation, functional specialization (FuncScore = average precision),
perturbation and partitions. Every number is in <code>analysis.json</code>.</p>
<table><tr><th>ability</th><th>prompts</th><th>tokens</th></tr>{probe_rows}</table>
<h2>Headline numbers</h2><table>{rows}</table>
<h2>Plots</h2>{images}
</body></html>
"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)
