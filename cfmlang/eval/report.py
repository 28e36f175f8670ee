"""Eval results as a table (text) or as JSON (documented in docs/cli.md)."""
from __future__ import annotations

import json

from cfmlang.eval.runner import EvalResult


def to_json(result: EvalResult, details: bool = False) -> dict:
    return {"model": result.model, "tasks": [
        {"task": t.task, "kind": t.kind, "items": t.items, "metrics": t.metrics, "seconds": round(t.seconds, 3),
         **({"details": list(t.details)} if details else {})} for t in result.tasks]}


def render_json(result: EvalResult, details: bool = False) -> str:
    return json.dumps(to_json(result, details), indent=2)


def render_table(result: EvalResult) -> str:
    rows = [("task", "kind", "items", "metric", "value")]
    for t in result.tasks:
        for i, (name, value) in enumerate(t.metrics.items()):
            rows.append((t.task if i == 0 else "", t.kind if i == 0 else "", str(t.items) if i == 0 else "",
                         name, f"{value:.4f}" if isinstance(value, float) else str(value)))
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    lines = ["  ".join(cell.ljust(w) if c < 4 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return f"{result.model}\n" + "\n".join(line.rstrip() for line in lines) + "\n"
