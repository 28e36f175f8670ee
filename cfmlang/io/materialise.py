"""Whole models in memory, for operations that must run the model (edits, training):
the node's tensors are pulled from its provider into a transformers module."""
from __future__ import annotations

import torch

from cfmlang.io.weights import WeightError


def materialise(provider, span=None):
    """(model in float32, eval mode; tokenizer) built from the provider's config,
    tokenizer files and tensors. The tensors are named as checkpoints name them; loading
    goes through transformers' own conversions (Mixtral's per-expert `w1`/`w2`/`w3`
    become the module's fused experts), and a tensor the module lacks or does not
    receive is an error, not a silently random weight."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    settings = dict(provider.config)     # the node's config (a grown model's, not its source's)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    state = {spec.name: provider.get(spec.name).to(torch.float32, copy=True) for spec in provider.specs}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=state, dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing, unexpected = list(info.get("missing_keys", ())), list(info.get("unexpected_keys", ()))
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        raise WeightError(f"the weights do not fit a {config.model_type} model: tensor `{name}` is "
                          f"{'missing' if missing else 'unexpected'}", span)
    model.eval()
    return model, AutoTokenizer.from_pretrained(provider.support_dir)
