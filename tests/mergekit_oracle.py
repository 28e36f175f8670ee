"""mergekit 0.1.5 as a test-time oracle, and small tensor helpers shared by merge tests."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (sharded or not)."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    """Run mergekit on a config dict (the YAML's content) and return its output tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return tensors(out)
