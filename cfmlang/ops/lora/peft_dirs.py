"""PEFT adapter directories at check time: adapter_config.json and the safetensors header
of adapter_model.safetensors, matched module by module against the base's tensors. No
tensor data is read here."""
from __future__ import annotations

import json
import math
from pathlib import Path

from cfmlang.compiler.ir import ArchInfo, LoraModuleSpec, TensorSpec
from cfmlang.io.sources import SourceError, safetensors_header_specs
from cfmlang.diagnostics import did_you_mean
from cfmlang.ops.lora.factors import PEFT_TENSOR, module_order, module_rank

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
UNSUPPORTED = {"use_dora": "DoRA", "use_qalora": "QA-LoRA", "lora_bias": "LoRA biases",
               "modules_to_save": "`modules_to_save`", "trainable_token_indices": "trainable tokens",
               "layer_replication": "layer replication", "target_parameters": "`target_parameters`"}


def read_peft_dir(folder: Path) -> tuple[dict, tuple[TensorSpec, ...]]:
    """The adapter's configuration and tensor specs, or E152 for what cfmlang cannot read."""
    if not folder.is_dir():
        raise SourceError("E050", f"`{folder}` is not a directory",
                          "a `peft` source is a directory written by PeftModel.save_pretrained")
    config = _read_config(folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise SourceError("E152", f"no {WEIGHTS_FILE} in {folder}",
                          "convert the pickled adapter_model.bin to safetensors (save_pretrained "
                          "with safe_serialization=True)" if pickled else
                          "a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors")
    return config, safetensors_header_specs(weights)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise SourceError("E152", f"no {CONFIG_FILE} in {path.parent}",
                          "a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors")
    try:
        config = json.loads(path.read_bytes())
    except ValueError as exc:
        raise SourceError("E152", f"{path} is not valid JSON: {exc}") from None
    except (RecursionError, OSError) as exc:
        reason = "nested too deep" if isinstance(exc, RecursionError) else exc
        raise SourceError("E152", f"{path} is not valid JSON: {reason}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise SourceError("E152", f"{path.name} describes a {kind or 'non-PEFT'} adapter, not LORA",
                          "lora bricks read PEFT LoRA adapters")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise SourceError("E152", f"the adapter uses {what} (`{key}` in {path.name}), which "
                              "cfmlang does not support", "save a plain LoRA adapter")
    if config.get("bias", "none") != "none":
        raise SourceError("E152", f"the adapter trains biases (`bias: {config['bias']}`), which "
                          "cfmlang does not support", "save a LoRA adapter with bias=\"none\"")
    for key, kinds in (("r", (int,)), ("lora_alpha", (int, float))):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
            raise SourceError("E152", f"{path.name} lacks a positive `{key}` (it holds {json.dumps(value)[:40]})",
                              "`r` is a positive whole number, `lora_alpha` a positive finite number")
    return config


def adapter_modules(config: dict, specs: list[TensorSpec], base: ArchInfo,
                    base_name: str) -> tuple[LoraModuleSpec, ...]:
    """Pair each module's lora_A and lora_B and check them against the base weight:
    the first problem in model order is reported (E150 missing module, E151 shapes)."""
    factors: dict[str, dict[str, TensorSpec]] = {}
    for spec in specs:
        match = PEFT_TENSOR.match(spec.name)
        if match is None or len(spec.shape) != 2:
            raise SourceError("E152", f"tensor `{spec.name}` is not a LoRA factor of a linear layer",
                              "lora bricks read the lora_A/lora_B weights of linear layers; embedding "
                              "adapters, DoRA and saved modules are not supported")
        factors.setdefault(match["module"], {})[match["side"]] = spec
    if not factors:
        raise SourceError("E152", f"{WEIGHTS_FILE} holds no LoRA weights")
    return tuple(_module(module, factors[module], config, base, base_name)
                 for module in sorted(factors, key=module_order))


def _module(module: str, pair: dict[str, TensorSpec], config: dict, base: ArchInfo,
            base_name: str) -> LoraModuleSpec:
    if len(pair) != 2:
        have = next(iter(pair))
        raise SourceError("E152", f"module `{module}` has lora_{have} but no lora_{'B' if have == 'A' else 'A'}")
    down, up = pair["A"].shape, pair["B"].shape
    weight = base.tensor(f"{module}.weight") if base.tensors else None
    if base.tensors and weight is None:
        known = sorted({t.name.removesuffix(".weight") for t in base.tensors if t.name.endswith(".weight")})
        raise SourceError("E150", f"adapter module `{module}` has no weight in `{base_name}`",
                          did_you_mean(module, known) or "the adapter was made for another model")
    out_features, in_features = weight.shape if weight is not None else (up[0], down[1])
    expected_rank = module_rank(config, module)
    if down != (expected_rank, in_features):
        raise SourceError("E151", f"`{module}.lora_A` has shape {list(down)} but `{base_name}` needs "
                          f"{[expected_rank, in_features]} (rank {expected_rank}, {in_features} inputs)",
                          "the adapter was made for a model of another size, or its r/rank_pattern "
                          "does not match its weights")
    if up != (out_features, expected_rank):
        raise SourceError("E151", f"`{module}.lora_B` has shape {list(up)} but `{base_name}` needs "
                          f"{[out_features, expected_rank]} (rank {expected_rank}, {out_features} outputs)",
                          "the adapter was made for a model of another size, or its r/rank_pattern "
                          "does not match its weights")
    return LoraModuleSpec(module, expected_rank, out_features, in_features)


def base_modules(base: ArchInfo, targets: list[str], rank: int) -> tuple[LoraModuleSpec, ...]:
    """The modules a new adapter on `base` targets (names ending in one of `targets`)."""
    found = [t for t in base.tensors if t.name.endswith(".weight") and len(t.shape) == 2
             and t.name.removesuffix(".weight").rsplit(".", 1)[-1] in targets]
    modules = [LoraModuleSpec(t.name.removesuffix(".weight"), rank, t.shape[0], t.shape[1])
               for t in found]
    return tuple(sorted(modules, key=lambda m: module_order(m.module)))


def fit_problem(module: LoraModuleSpec, model: ArchInfo, model_name: str) -> tuple[str, str] | None:
    """(code, message) saying why an adapter module does not fit `model`'s weights, or
    None when it does."""
    weight = model.tensor(module.weight)
    if not model.tensors:
        return None
    if weight is None:
        return "E150", f"adapter module `{module.module}` has no weight in `{model_name}`"
    if tuple(weight.shape) != (module.out_features, module.in_features):
        return "E151", (f"adapter module `{module.module}` is {module.out_features}x{module.in_features} "
                        f"but `{module.weight}` of `{model_name}` is {'x'.join(map(str, weight.shape))}")
    return None
