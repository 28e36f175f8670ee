"""Loading an artifact as a transformers module: a PeftModel for adapters, routed FFNs
replaced by RoutedMLP for routed artifacts, an AdapterMixture for routes over lora bricks."""
from __future__ import annotations

import json
from pathlib import Path

from cfmlang.artifact.read import malformed, model_config, read_manifest, refused_by_transformers

ROUTED_KINDS = ("adapter-routed", "routed-topk")


def load_eager(directory, manifest: dict | None = None, **kwargs):
    """The transformers model of an artifact directory: a PeftModel for adapters, routed
    FFNs replaced by `cfmlang.runtime.routed_mlp.RoutedMLP` for routed artifacts, an
    `AdapterMixture` around the base model for routes over lora bricks.
    `manifest` is the artifact's cfm.json content (read from the directory if not given)."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        base = adapter_base(directory)
        with refused_by_transformers(f"the base model {base} of adapter {directory}", "E219"):
            base_model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
        return PeftModel.from_pretrained(base_model, directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    routing = routing_of(directory, manifest)
    transformers_config(directory)      # E219 before any weight is read
    with refused_by_transformers(f"the model in {directory}", "E219"):
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    try:
        if manifest.get("kind") == "adapter-routed":
            from cfmlang.runtime.adapter_mixture import load_mixture

            return load_mixture(model, directory, routing)
        if manifest.get("kind") == "routed-topk":
            from cfmlang.runtime.routed_model import route_model

            return route_model(model, directory, routing)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise malformed(directory / "cfm.json", f"has a `routing` section this artifact's kind "
                                                f"cannot use ({type(exc).__name__}: {exc})") from None
    return model


def transformers_config(directory: Path):
    """The artifact's config as transformers reads it; E219 when config.json is missing,
    is not a JSON object or transformers refuses it (an unknown model_type, a value of the
    wrong kind)."""
    from transformers import AutoConfig

    model_config(directory)
    with refused_by_transformers(directory / "config.json", "E219"):
        return AutoConfig.from_pretrained(directory)


def routing_of(directory: Path, manifest: dict) -> dict | None:
    """The manifest's `routing` object for routed kinds (E213 when it is not one)."""
    if manifest.get("kind") not in ROUTED_KINDS:
        return None
    routing = manifest.get("routing")
    if not isinstance(routing, dict):
        raise malformed(directory / "cfm.json", f"is of kind `{manifest['kind']}` without a `routing` object")
    return routing


def adapter_base(directory: Path) -> Path:
    """The local base model directory an adapter artifact names (never a hub id)."""
    path = directory / "adapter_config.json"
    try:
        base = json.loads(path.read_bytes()).get("base_model_name_or_path")
    except (ValueError, RecursionError, AttributeError, OSError) as exc:
        raise malformed(path, f"is not a JSON object ({type(exc).__name__})") from None
    if not isinstance(base, str) or not base or "\x00" in base or not (Path(base) / "config.json").is_file():
        raise malformed(path, f"names base model {json.dumps(base)[:80]}, which is not a local model "
                              "directory (cfmlang never downloads)")
    return Path(base)
