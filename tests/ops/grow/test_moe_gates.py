"""Router initialisation of MoE-from-dense (cfmlang.ops.grow.prompt_gates) against mergekit
0.1.5's own functions on a tiny Llama with a word-level tokenizer."""
from __future__ import annotations

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.moe.config import Expert
from mergekit.moe.router import get_gate_params
from models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfmlang.ops.grow.prompt_gates import prompted_gates, random_gates

PROMPTS = [  # (positive, negative) per expert
    (["write code for a loop", "print the function"], []),
    (["prove the equation", "add a number to the sum"], ["write a poem"]),
    (["a poem of love", "verse and rhyme at night", "the sea"], ["code"]),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tiny_model(tmp_path_factory.mktemp("moe") / "base", seed=3)
    tiny_tokenizer(folder)
    return folder


def theirs(base, mode):
    experts = [Expert(source_model=ModelReference.parse(str(base)), positive_prompts=pos,
                      negative_prompts=neg or None) for pos, neg in PROMPTS]
    tokenizer = AutoTokenizer.from_pretrained(base)
    return get_gate_params(ModelReference.parse(str(base)), tokenizer, experts, mode=mode, device="cpu")


def ours(base, mode, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    return prompted_gates(mode, model, AutoTokenizer.from_pretrained(base), PROMPTS)


def test_cheap_embed_is_bit_identical_to_mergekit(base):
    got, expected = ours(base, "cheap_embed"), theirs(base, "cheap_embed")
    assert got.shape == expected.shape == (4, 3, 32)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_modes_match_mergekit(base, mode):
    """mergekit runs the model in bfloat16: in bfloat16 too, ours is identical; in
    float32 it is the same direction to bfloat16 precision."""
    expected = theirs(base, mode)
    assert torch.equal(ours(base, mode, torch.bfloat16), expected)
    got = ours(base, mode)
    cosine = torch.nn.functional.cosine_similarity(got, expected.float(), dim=-1)
    assert cosine.min() > 0.999
    assert torch.allclose(got.norm(dim=-1), torch.ones(4, 3), atol=1e-6)
    assert (got[:, 0] - got[:, 1]).abs().max() > 0.1       # experts differ


def test_hidden_uses_the_state_entering_each_layer(base):
    """Layer 0's vector is built from token embeddings alone: the last token of every
    positive prompt, averaged (no negatives for expert 0)."""
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    gates = prompted_gates("hidden", model, tokenizer, PROMPTS)
    batch = tokenizer(["<s>" + p for p in PROMPTS[0][0]], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    last = model.get_input_embeddings().weight[batch["input_ids"][:, -1]].mean(dim=0)
    assert torch.allclose(gates[0, 0], last / last.norm(), atol=1e-6)


def test_random_modes_are_seeded_and_scaled():
    one = random_gates("random", 4, 3, 32, torch.Generator().manual_seed(7))
    assert torch.equal(one, random_gates("random", 4, 3, 32, torch.Generator().manual_seed(7)))
    uniform = random_gates("uniform_random", 4, 3, 32, torch.Generator().manual_seed(7))
    bound = (1 / 32) ** 0.5
    assert uniform.abs().max() <= bound and uniform.abs().max() > 0.9 * bound
