"""grow moe (mergekit-moe semantics): a Mixtral model from a base and fine-tunes of it,
compared with mergekit-moe 0.1.5 on tiny Llama models with a word-level tokenizer."""
from __future__ import annotations

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.moe.config import Expert, MoEMergeConfig
from mergekit.options import MergeOptions
from mergekit.scripts.moe import build
from models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import cfmlang
from cfmlang.diagnostics import CompileError

PROMPTS = {
    "math": (["prove the equation", "add a number to the sum"], ["write a poem"]),
    "code": (["write code for a loop", "print the function"], []),
    "base": (["a poem of love", "the sea at night"], ["code"]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    found = {name: tiny_model(root / name, seed=seed) for seed, name in enumerate(["base", "math", "code"], 1)}
    tiny_tokenizer(found["base"])
    return found


def brick(models, gate_mode: str, extra: str = "") -> str:
    lines = [f'model {n}:\n  source: hf "{p}"\n' for n, p in models.items()]
    inputs = "".join(f"    {n}: {{positive_prompts: {list(pos)}, negative_prompts: {list(neg)}}}\n"
                     .replace("'", '"') for n, (pos, neg) in PROMPTS.items())
    return ("".join(lines) + f"grow mix:\n  method: moe\n  base: base\n  inputs:\n{inputs}"
            f"  gate_mode: {gate_mode}\n  experts_per_token: 2\n{extra}output: mix\n")


def compile_ours(models, tmp_path, gate_mode, extra="", noise=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{gate_mode}.brick"
    text = brick(models, gate_mode, extra)
    path.write_text(text.replace("math: {", "math: {noise_scale: 0.01, ") if noise else text)
    cfmlang.compile(path, tmp_path / f"ours-{gate_mode}")
    return tmp_path / f"ours-{gate_mode}"


def compile_mergekit(models, tmp_path, gate_mode):
    experts = [Expert(source_model=ModelReference.parse(str(models[n])), positive_prompts=pos,
                      negative_prompts=neg or None) for n, (pos, neg) in PROMPTS.items()]
    config = MoEMergeConfig(base_model=ModelReference.parse(str(models["base"])), experts=experts,
                            gate_mode=gate_mode, experts_per_token=2)
    out = tmp_path / f"mergekit-{gate_mode}"
    build(config, str(out), MergeOptions(quiet=True, copy_tokenizer=True), device="cpu")
    return out


def state(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def test_cheap_embed_equals_mergekit_moe_tensor_for_tensor(models, tmp_path):
    ours, theirs = state(compile_ours(models, tmp_path, "cheap_embed")), \
        state(compile_mergekit(models, tmp_path, "cheap_embed"))
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    experts = [k for k in ours if k.endswith("experts.down_proj")]
    assert len(experts) == 4 and ours[experts[0]].shape[0] == 3


def test_hidden_gates_follow_mergekit_up_to_its_bfloat16_model(models, tmp_path):
    """mergekit runs the base in bfloat16 to embed the prompts; cfmlang in float32: the
    routers point the same way, every other tensor is identical."""
    ours_dir = compile_ours(models, tmp_path, "hidden")
    ours, theirs = state(ours_dir), state(compile_mergekit(models, tmp_path, "hidden"))
    for name in ours:
        if name.endswith("mlp.gate.weight"):
            cosine = torch.nn.functional.cosine_similarity(ours[name], theirs[name], dim=-1)
            assert cosine.min() > 0.999, name
        else:
            assert torch.equal(ours[name], theirs[name]), name
    model = cfmlang.load(ours_dir)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_experts_per_tok == 2
    out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_random_gates_and_noise_are_seeded(models, tmp_path):
    extra = "  seed: 3\n"
    one = state(compile_ours(models, tmp_path / "a", "random", extra, noise=True))
    two = state(compile_ours(models, tmp_path / "b", "random", extra, noise=True))
    assert all(torch.equal(one[k], two[k]) for k in one)
    router = one["model.layers.0.mlp.gate.weight"]
    assert router.shape == (3, 32) and 0.5 < router.std() < 1.5
    math_gate = state(models["math"])["model.layers.0.mlp.gate_proj.weight"]
    noise = one["model.layers.0.mlp.experts.gate_up_proj"][0, :64] - math_gate      # expert 0 = math
    assert 0.007 < noise.std() < 0.013
    code_gate = state(models["code"])["model.layers.0.mlp.gate_proj.weight"]
    assert torch.equal(one["model.layers.0.mlp.experts.gate_up_proj"][1, :64], code_gate)


@pytest.mark.parametrize("change, code", [
    ("  experts_per_token: 2\n", None),
    ("  experts_per_token: 4\n", "E116"),
])
def test_experts_per_token_cannot_exceed_the_experts(models, tmp_path, change, code):
    path = tmp_path / "m.brick"
    path.write_text(brick(models, "random").replace("  experts_per_token: 2\n", change))
    if code is None:
        assert cfmlang.check(path).node("mix").method == "moe"
        return
    with pytest.raises(CompileError) as exc:
        cfmlang.check(path)
    assert [d.code for d in exc.value.diagnostics] == [code]


def test_prompted_gates_need_positive_prompts(models, tmp_path):
    path = tmp_path / "m.brick"
    path.write_text(brick(models, "hidden").replace('{positive_prompts: ["write code for a loop", '
                                                    '"print the function"], negative_prompts: []}', "{}"))
    with pytest.raises(CompileError) as exc:
        cfmlang.check(path)
    (problem,) = exc.value.diagnostics
    assert problem.code == "E117" and "`code`" in problem.message
