"""LoRA bricks: read from PEFT adapter directories, trained on a data file, or extracted
from a fine-tune (the truncated SVD of tuned - base per linear layer); PEFT's scaling,
pattern and configuration rules."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from cfmlang.ops.registry import Method, Params, register

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Llama's projection names: the targets of a model whose family cfmlang cannot describe."""
TRAINED_ROLES = (("attn.q", "attn.v"), ("attn.qkv",))
"""What a trained adapter targets by default: the query and value projections, or the
fused query/key/value projection of families that have one (PEFT's usual choice)."""
EXTRACTED_ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "ffn.gate", "ffn.up", "ffn.down",
                   "ffn.gate_up")
"""What an extracted adapter targets by default: every linear projection of a layer."""


def default_targets(layout, roles) -> list[str]:
    """The module names of the first of `roles` (a tuple of role groups, or one group)
    the family has; Llama's names for a family cfmlang cannot describe."""
    groups = roles if isinstance(roles[0], tuple) else (roles,)
    if layout is None:
        return ["q_proj", "v_proj"] if groups is TRAINED_ROLES else list(LINEAR_MODULES)
    return next((found for group in groups if (found := layout.leaves(group))), [])


class TrainOptions(Params):
    """`train:` of a lora brick (its `data` file is checked separately)."""

    data: str
    steps: Annotated[int, Field(ge=1)] = 100
    rank: Annotated[int, Field(ge=1)] = 8
    alpha: Annotated[float, Field(gt=0)] | None = None        # default: 2 x rank
    lr: Annotated[float, Field(gt=0)] = 1e-3
    seed: Annotated[int, Field(ge=0)] = 0
    batch_size: Annotated[int, Field(ge=1)] = 4
    max_length: Annotated[int, Field(ge=8)] = 128
    targets: Annotated[list[str], Field(min_length=1)] | None = None
    """Module names; None: the family's query and value projections (TRAINED_ROLES)."""
    rslora: bool = False
    system: str | None = None
    """The system message chat-formatted prompts get; None: the chat template's own
    (SmolLM2's adds a default one), "" for an empty one (fewer tokens per sample)."""


class ExtractSpec(Params):
    """`extract: {from: TUNED, base: BASE, rank: N, ...}`: an adapter from `TUNED - BASE`."""

    from_: str = Field(alias="from")
    base: str
    rank: Annotated[int, Field(ge=1)]
    threshold: Annotated[float, Field(ge=0, lt=1)] = 0.0
    targets: Annotated[list[str], Field(min_length=1)] | None = None


@register
class LoraBrick(Method):
    keyword = "brick"
    name = "lora"
    summary = ("a low-rank adapter: `source: peft \"dir\"`, trained with `train: {data: ...}`, "
               "or extracted from a fine-tune by SVD (`extract:`)")

    class Extract(Params):
        """The numeric part of `extract:` (its `from` and `base` are references)."""

        rank: Annotated[int, Field(ge=1)]
        threshold: Annotated[float, Field(ge=0, lt=1)] = 0.0
        targets: Annotated[list[str], Field(min_length=1)] | None = None

    class Options(Params):
        """What a lora brick statement holds: exactly one of `source`, `train`, `extract`
        (shown in the method reference; each part is checked on its own)."""

        source: str | None = None
        """`peft "DIR"`: a PEFT adapter directory."""
        base: str | None = None
        """The model the adapter belongs to (with `source` and `train`)."""
        train: TrainOptions | None = None
        extract: ExtractSpec | None = None


def module_order(module: str) -> tuple:
    """Model order of adapted modules (layer, then attention before MLP as Llama
    registers them): the order PEFT visits modules in, which fixes DARE's draws."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", module)
    kind = module.rsplit(".", 1)[-1]
    position = LINEAR_MODULES.index(kind) if kind in LINEAR_MODULES else len(LINEAR_MODULES)
    return (int(match.group(1)) if match else -1, position, module)


def pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern rule: the first key that matches the end of the
    module path on a dot boundary."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_rank(config: dict, module: str) -> int:
    return int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))


def module_scale(config: dict, module: str) -> float:
    """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA, with per-module patterns."""
    rank = module_rank(config, module)
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def peft_rank(config: dict) -> int:
    """The rank PEFT's add_weighted_adapter allots to an adapter: r, or the largest
    rank in its rank_pattern."""
    return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])


@dataclass(frozen=True)
class LowRank:
    """One layer's factors: delta ~= up @ down, with the relative error of that."""

    down: torch.Tensor      # lora_A: [rank, in]
    up: torch.Tensor        # lora_B: [out, rank]
    relative_error: float


def extract_low_rank(tuned: torch.Tensor, base: torch.Tensor, rank: int, threshold: float) -> LowRank:
    """Best rank-`rank` approximation of the weight delta (Eckart-Young), dropping
    singular values below `threshold` times the largest. The singular values are split
    evenly (sqrt) between the two factors so both have similar scale."""
    delta = tuned.double() - base.double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = int((s > threshold * s[0]).sum()) if threshold > 0 and s[0] > 0 else len(s)
    keep = max(1, min(rank, keep))
    root = s[:keep].sqrt()
    up, down = u[:, :keep] * root, root[:, None] * vh[:keep]
    norm = torch.linalg.matrix_norm(delta)
    error = torch.linalg.matrix_norm(delta - up @ down) / norm if norm > 0 else torch.tensor(0.0)
    return LowRank(down.to(tuned.dtype).contiguous(), up.to(tuned.dtype).contiguous(), float(error))


def is_target(tensor_name: str, targets: list[str]) -> bool:
    parts = tensor_name.split(".")
    return tensor_name.endswith(".weight") and len(parts) >= 2 and parts[-2] in targets


def peft_config(rank: int, alpha: float, targets: list[str], *, rslora: bool = False,
                ranks: dict[str, int] | None = None) -> dict:
    """adapter_config.json of a LoRA adapter. `ranks` lists modules whose rank differs
    from `rank` (extraction); they keep scale 1 through an equal alpha."""
    pattern = {module: r for module, r in (ranks or {}).items() if r != rank}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
            "r": rank, "lora_alpha": alpha, "target_modules": sorted(set(targets)),
            "rank_pattern": pattern, "alpha_pattern": dict(pattern), "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": rslora,
            "init_lora_weights": True, "inference_mode": True}


@dataclass(frozen=True)
class LoraFactors:
    """One module's adapter: delta W = scale * up @ down."""

    down: torch.Tensor      # lora_A: [rank, in]
    up: torch.Tensor        # lora_B: [out, rank]
    scale: float

    def delta(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """scale * B @ A in float32 (rows [start, stop) of it when given), in PEFT's order
        of operations."""
        up = self.up if rows is None else self.up[rows[0]:rows[1]]
        return (up.float() @ self.down.float()) * self.scale


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter held in memory: factors per module path, in model order, and its PEFT
    configuration. Every module is (A, B, scale), so adapters of one base stack along a
    new leading dimension once ranks are zero-padded to the largest."""

    modules: dict[str, LoraFactors]
    config: dict

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of adapter_model.safetensors, named as PEFT saves them."""
        tensors = {}
        for module, factors in self.modules.items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = factors.down.contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = factors.up.contiguous()
        return tensors


PEFT_PREFIX = "base_model.model."
PEFT_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


def adapter_from_peft(tensors: dict[str, torch.Tensor], config: dict) -> LoraAdapter:
    """An adapter from PEFT-named tensors (already checked to pair up), in float32 as PEFT
    computes with them."""
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = PEFT_TENSOR.match(name)
        sides.setdefault(match["module"], {})[match["side"]] = tensor.float()
    modules = {module: LoraFactors(pair["A"], pair["B"], module_scale(config, module))
               for module, pair in sorted(sides.items(), key=lambda item: module_order(item[0]))}
    return LoraAdapter(modules, config)
