"""Whole models in memory, for operations that must run the model (edits, training):
the node's tensors are pulled from its provider into a transformers module."""
from __future__ import annotations

import torch

from cfmlang.io.weights import WeightError


def materialise(provider, span=None):
    """(model in float32, eval mode; tokenizer) built from the provider's config,
    tokenizer files and tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    settings = dict(provider.config)     # the node's config (a grown model's, not its source's)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {spec.name: provider.get(spec.name).to(torch.float32) for spec in provider.specs}
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        name = (missing or result.unexpected_keys)[0]
        raise WeightError(f"the weights do not fit a {config.model_type} model: tensor `{name}` is "
                          f"{'missing' if missing else 'unexpected'}", span)
    model.tie_weights()
    model.eval()
    return model, AutoTokenizer.from_pretrained(provider.support_dir)
