"""Loading an artifact as a transformers module: a PeftModel for adapters, routed FFNs
replaced by RoutedMLP for routed artifacts, an AdapterMixture for routes over lora bricks."""
from __future__ import annotations

import json
from pathlib import Path


def load_eager(directory, manifest: dict | None = None, **kwargs):
    """The transformers model of an artifact directory: a PeftModel for adapters, routed
    FFNs replaced by `cfmlang.runtime.routed_mlp.RoutedMLP` for routed artifacts, an
    `AdapterMixture` around the base model for routes over lora bricks.
    `manifest` is the artifact's cfm.json content (read from the directory if not given)."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, **kwargs), directory)
    manifest = manifest or json.loads((directory / "cfm.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if manifest.get("kind") == "adapter-routed":
        from cfmlang.runtime.adapter_mixture import load_mixture

        return load_mixture(model, directory, manifest["routing"])
    if manifest.get("kind") == "routed-topk":
        from cfmlang.runtime.routed_model import route_model

        return route_model(model, directory, manifest["routing"])
    return model
