"""LoRA bricks extracted from a fine-tune: the truncated SVD of (tuned - base) per
linear layer, written as a PEFT adapter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from cfmlang.stdlib.registry import Method, Params, register

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@register
class LoraBrick(Method):
    keyword = "brick"
    name = "lora"
    summary = "a low-rank adapter; today: extracted from a fine-tune by SVD (`extract:`)"

    class Options(Params):
        """The numeric part of `extract:` (its `from` and `base` are references)."""

        rank: Annotated[int, Field(ge=1)]
        threshold: Annotated[float, Field(ge=0, lt=1)] = 0.0
        targets: Annotated[list[str], Field(min_length=1)] = list(LINEAR_MODULES)


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


def peft_config(ranks: dict[str, int], targets: list[str], rank: int, base_path: str) -> dict:
    """adapter_config.json: scaling lora_alpha / r is 1 for every module (alpha = rank)."""
    pattern = {module: r for module, r in ranks.items() if r != rank}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "r": rank, "lora_alpha": rank, "target_modules": sorted(set(targets)),
            "rank_pattern": pattern, "alpha_pattern": dict(pattern), "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "init_lora_weights": True, "inference_mode": True}
