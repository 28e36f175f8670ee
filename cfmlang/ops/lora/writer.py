"""Writing a lora brick: a PEFT adapter directory (with the base's support files) that
other programs read with `source: peft "DIR"`."""
from __future__ import annotations

from pathlib import Path

from cfmlang.artifact.write import copy_support_files, write_adapter
from cfmlang.ops.base import Output
from cfmlang.ops.lora.providers import AdapterProvider


def write_adapter_dir(provider: AdapterProvider, folder: Path, progress, log) -> Output:
    """A PEFT adapter directory (with the base's support files): other programs read it
    with `source: peft "DIR"`."""
    adapter = provider.adapter(progress)
    tensors = adapter.peft_tensors()
    files = _write_peft_dir(folder, provider)
    copy_support_files(provider.support_dir, folder, None, provider.config)
    _log_adapter(provider.report, log)
    extras = {"standard": False, "kind": "peft-lora", "adapter": provider.report}
    return Output(files, len(tensors), sum(t.numel() * t.element_size() for t in tensors.values()), extras)


def _write_peft_dir(folder: Path, provider: AdapterProvider) -> list[str]:
    """A PEFT adapter directory whose base is the output's support directory (the base
    model's config and tokenizer), with the training loss curve when it was trained."""
    config = {**provider.adapter().config, "base_model_name_or_path": provider.base_path}
    files = write_adapter(folder, provider.adapter().peft_tensors(), config)
    if "loss" in provider.report:
        lines = ["step,loss"] + [f"{step},{loss:.6f}" for step, loss in enumerate(provider.report["loss"], 1)]
        (folder / "loss.csv").write_text("\n".join(lines) + "\n")
        files.append("loss.csv")
    return files


def _log_adapter(report: dict, log) -> None:
    if "relative_error" in report:
        errors = report["relative_error"]
        log(f"extracted {len(report['ranks'])} LoRA modules; relative reconstruction error "
            f"max {max(errors.values(), default=0.0):.3g}, mean {sum(errors.values()) / max(len(errors), 1):.3g}")
        if report["not_captured"]:
            log(f"warning: {len(report['not_captured'])} weights differ outside the target modules and are "
                f"not in the adapter (first: {report['not_captured'][0]})")
    if "loss" in report:
        log(f"trained {len(report['loss'])} steps; loss {report['loss'][0]:.4f} -> {report['loss'][-1]:.4f}")
