"""Routing over LoRA adapters at run time (cfmlang.runtime.adapter_mixture), against PEFT:
adapters made with peft on a tiny Llama, mixed by fixed, retrieved and gated
coefficients, exported with torch.export."""
from __future__ import annotations

import copy

import pytest
import torch
from models import tiny_model
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from cfmlang.runtime.adapter_mixture import (AdapterMixture, LoraFactors, new_gates, top_k_choice,
                                             top_k_weights, train_gates)

ADAPTERS = {   # name: (targets, rank, alpha, rslora)
    "attn": (["q_proj", "v_proj"], 4, 8, False),
    "all": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 2, 4, True),
    "mlp": (["gate_proj", "down_proj"], 3, 3, False),
}
TOL = 1e-5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("mix") / "base", seed=5)


def fresh(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


@pytest.fixture(scope="module")
def peft_adapters(base_dir):
    """name -> the PEFT model with that one adapter (random, non-zero B)."""
    made = {}
    for seed, (name, (targets, rank, alpha, rslora)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + seed)
        config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                            init_lora_weights=False, lora_dropout=0.0)
        made[name] = get_peft_model(fresh(base_dir), config).eval()
    return made


def factors_of(peft_model) -> dict[str, LoraFactors]:
    """The adapter as cfmlang factors, read from the PEFT modules."""
    found = {}
    for path, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            found[path] = LoraFactors(module.lora_A["default"].weight.detach().clone(),
                                      module.lora_B["default"].weight.detach().clone(),
                                      module.scaling["default"])
    return found


def merged_with(base_dir, peft_adapters, weights: list[float]):
    """W + sum_n c_n * delta_n, each delta from PEFT's own merge_and_unload."""
    base = fresh(base_dir)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for weight, peft_model in zip(weights, peft_adapters.values()):
        merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
        for key in state:
            state[key] += weight * (merged[key] - base.state_dict()[key])
    base.load_state_dict(state)
    return base


def mixture(base_dir, peft_adapters, method, **options):
    adapters = [factors_of(m) for m in peft_adapters.values()]
    return AdapterMixture(fresh(base_dir), adapters, list(peft_adapters), method, **options).eval()


IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 1], [8, 8, 120, 33, 2, 71, 9, 15]])


def test_fixed_coefficients_equal_peft_merged_deltas(base_dir, peft_adapters):
    weights = [0.7, -0.4, 1.3]
    embeddings = torch.eye(3, 32)
    mixed = mixture(base_dir, peft_adapters, "retrieve", top_k=3, embeddings=embeddings)
    mixed.coefficients.select(torch.tensor([[0, 1, 2], [2, 0, 1]]),
                              torch.tensor([weights, [weights[2], weights[0], weights[1]]]))
    with torch.no_grad():
        ours = mixed.model(input_ids=IDS).logits
        expected = merged_with(base_dir, peft_adapters, weights)(input_ids=IDS).logits
    assert (ours - expected).abs().max() < TOL
    assert (ours - fresh(base_dir)(input_ids=IDS).logits).abs().max() > 1e-3   # the adapters matter


def test_top_k_weights():
    chosen, weights = top_k_choice(torch.tensor([[0.1, 0.9, 0.5, -1.0]]), 2, "uniform", 1.0)
    assert chosen.tolist() == [[1, 2]] and weights.tolist() == [[0.5, 0.5]]
    scores = torch.tensor([[0.1, 0.9, 0.5, -1.0]])
    assert torch.equal(top_k_weights(scores, 2, "uniform", 1.0), torch.tensor([[0, 0.5, 0.5, 0]]))
    soft = top_k_weights(scores, 2, "softmax", 0.5)
    expected = torch.softmax(torch.tensor([0.9, 0.5]) / 0.5, dim=0)
    assert torch.allclose(soft[0, [1, 2]], expected) and soft[0, 0] == 0 and soft[0, 3] == 0


def test_retrieval_picks_the_adapter_whose_prompts_match_and_equals_it_in_peft(base_dir, peft_adapters):
    """Each adapter's key is the embedding of one of the two sequences (or of noise):
    top-1 retrieval applies exactly that adapter, as PEFT does."""
    plain = fresh(base_dir)
    with torch.no_grad():
        hidden = plain.model(input_ids=IDS).last_hidden_state.mean(dim=1)
    keys = torch.stack([hidden[1], torch.randn(32), hidden[0]])     # attn <- seq 1, mlp <- seq 0
    mixed = mixture(base_dir, peft_adapters, "retrieve", top_k=1, embeddings=keys)
    assert mixed.chosen(IDS) == [["mlp"], ["attn"]]
    with torch.no_grad():
        ours = mixed(IDS).logits
        for row, name in ((0, "mlp"), (1, "attn")):
            theirs = peft_adapters[name](input_ids=IDS[row:row + 1]).logits[0]
            assert (ours[row] - theirs).abs().max() < TOL, name


def test_top2_retrieval_gathers_exactly_the_dense_mix(base_dir, peft_adapters):
    """Each sequence applies only its two chosen adapters (gathered by index, different
    pairs per sequence, ranks 4/2/3 padded to 4): the logits equal, row by row, the base
    plus those two PEFT deltas scaled by the softmax weights, i.e. the dense masked mix."""
    plain = fresh(base_dir)
    with torch.no_grad():
        hidden = plain.model(input_ids=IDS).last_hidden_state.mean(dim=1)
    keys = torch.stack([hidden[0] + hidden[1], hidden[0], hidden[1]])    # seq 0: attn+all, seq 1: attn+mlp
    mixed = mixture(base_dir, peft_adapters, "retrieve", top_k=2, embeddings=keys, temperature=0.05)
    assert [sorted(row) for row in mixed.chosen(IDS)] == [["all", "attn"], ["attn", "mlp"]]
    chosen, weights = mixed.retrieval_choice(IDS)
    dense = torch.zeros(2, 3).scatter(-1, chosen, weights)
    assert (dense > 0.05).sum(-1).tolist() == [2, 2]          # both chosen adapters weigh in
    with torch.no_grad():
        ours = mixed(IDS).logits
        for row in range(2):
            expected = merged_with(base_dir, peft_adapters, dense[row].tolist())(input_ids=IDS[row:row + 1]).logits
            assert (ours[row] - expected[0]).abs().max() < TOL, row
        assert (ours[0] - ours[1]).abs().max() > 1e-3


def test_a_shallower_embedder_runs_only_the_first_layers(base_dir, peft_adapters):
    """embed_layers 1: queries are embedded by the first decoder layer and the final norm
    (every adapter off), and the model is whole again afterwards."""
    plain = fresh(base_dir)
    with torch.no_grad():
        inner = plain.model
        shallow = inner.norm(inner.layers[0](inner.embed_tokens(IDS),
                                             position_embeddings=inner.rotary_emb(inner.embed_tokens(IDS),
                                                                                  torch.arange(8)[None]),
                                             attention_mask=None))
    keys = torch.stack([shallow[1].mean(0), torch.randn(32), shallow[0].mean(0)])
    mixed = mixture(base_dir, peft_adapters, "retrieve", top_k=1, embeddings=keys, embed_layers=1)
    assert mixed.chosen(IDS) == [["mlp"], ["attn"]]
    assert len(mixed.model.model.layers) == plain.config.num_hidden_layers


def test_retrieval_generates_like_the_chosen_peft_adapter(base_dir, peft_adapters):
    plain = fresh(base_dir)
    prompt = IDS[:1]
    with torch.no_grad():
        key = plain.model(input_ids=prompt).last_hidden_state.mean(dim=1)[0]
    keys = torch.stack([torch.randn(32), key, -key])
    mixed = mixture(base_dir, peft_adapters, "retrieve", top_k=1, embeddings=keys)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    ours = mixed.generate(prompt, **settings)
    theirs = peft_adapters["all"].generate(input_ids=prompt, **settings)
    assert torch.equal(ours, theirs)


def test_untrained_gates_mix_every_adapter_equally(base_dir, peft_adapters):
    mixed = mixture(base_dir, peft_adapters, "gate", top_k=3, gates=new_gates(fresh(base_dir), 3))
    with torch.no_grad():
        ours = mixed(IDS).logits
        expected = merged_with(base_dir, peft_adapters, [1 / 3] * 3)(input_ids=IDS).logits
    assert (ours - expected).abs().max() < TOL


def test_gates_choose_per_token(base_dir, peft_adapters):
    """A gate that scores adapter n by hidden-state coordinate n: each token's mix depends
    on its own state, and the weights of every layer are a top-2 softmax."""
    gates = new_gates(fresh(base_dir), 3)
    for gate in gates:
        gate.weight.data[:, :3] = torch.eye(3) * 50
    mixed = mixture(base_dir, peft_adapters, "gate", top_k=2, gates=gates)
    with torch.no_grad():
        mixed(IDS)
    for layer, weights in mixed.coefficients.per_layer.items():
        assert weights.shape == (2, 8, 3)
        assert torch.allclose(weights.sum(-1), torch.ones(2, 8))
        assert ((weights > 0).sum(-1) == 2).all(), layer
    first = mixed.coefficients.per_layer[0]
    assert not torch.equal(first[0, 0], first[0, 1])


def dataset_loss(mixed, batches) -> float:
    with torch.no_grad():
        return sum(float(mixed(ids, labels=ids).loss) for ids in batches) / len(batches)


def test_training_the_gates_lowers_the_loss_and_touches_nothing_else(base_dir, peft_adapters):
    """Text sampled from the `mlp` adapter's model: fitting the gates to it lowers the
    loss (they learn to favour that adapter) and changes no other weight."""
    torch.manual_seed(0)
    with torch.no_grad():
        batches = [peft_adapters["mlp"].generate(input_ids=IDS[:, i:i + 2], max_new_tokens=14, do_sample=True,
                                                 pad_token_id=0) for i in range(3)]
    mixed = mixture(base_dir, peft_adapters, "gate", top_k=2, gates=new_gates(fresh(base_dir), 3))
    frozen = {k: v.clone() for k, v in mixed.state_dict().items() if "gates" not in k}
    before = dataset_loss(mixed, batches)
    losses = train_gates(mixed, batches, steps=24, lr=0.05, seed=0)
    after = dataset_loss(mixed, batches)
    assert after < before - 1e-3, (before, after)
    assert all(torch.equal(v, mixed.state_dict()[k]) for k, v in frozen.items())
    again = mixture(base_dir, peft_adapters, "gate", top_k=2, gates=new_gates(fresh(base_dir), 3))
    assert train_gates(again, batches, steps=24, lr=0.05, seed=0) == losses     # deterministic


@pytest.mark.parametrize("method, embed_layers", [("retrieve", None), ("retrieve", 1), ("gate", None)])
def test_exports_without_data_dependent_ops(base_dir, peft_adapters, method, embed_layers):
    options = {"embeddings": torch.randn(3, 32), "embed_layers": embed_layers} if method == "retrieve" \
        else {"gates": new_gates(fresh(base_dir), 3)}
    if method == "gate":
        for gate in options["gates"]:
            torch.nn.init.normal_(gate.weight)
    mixed = mixture(base_dir, peft_adapters, method, top_k=2, **options)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids, use_cache=False).logits

    wrapped = Logits(mixed)
    program = torch.export.export(wrapped, (IDS,))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any(name in op for op in ops for name in ("nonzero", "masked_select", "index_put"))
    assert ("aten.index_select.default" in ops) == (method == "retrieve")     # only the chosen factors
    other = torch.randint(0, 128, IDS.shape)
    with torch.no_grad():
        for ids in (IDS, other):
            assert (program.module()(ids) - wrapped(ids)).abs().max() < TOL
