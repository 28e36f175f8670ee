"""Emergent-brick analysis (Configurable Foundation Models, arXiv 2409.02877, §4).

For other modules: `func_scores(model, probes)` gives FuncScore [layers, neurons,
abilities]; `read_probes()` + `tokenize(texts, tokenizer, max_tokens)` give the shipped
probe set as `Probes`."""
from cfmlang.analysis.funcscore import average_precision, func_scores, top_neurons
from cfmlang.analysis.pipeline import analyze_model
from cfmlang.analysis.probes import Probes, ProbeTexts, read_probes, tokenize
from cfmlang.analysis.run import Settings, analyze

__all__ = [
           "ProbeTexts",
           "Probes",
           "Settings",
           "analyze",
           "analyze_model",
           "average_precision",
           "func_scores",
           "read_probes",
           "tokenize",
           "top_neurons",
]
