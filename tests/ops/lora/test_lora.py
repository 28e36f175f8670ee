"""LoRA bricks from PEFT directories, fused into models and merged with PEFT's
add_weighted_adapter semantics, checked against peft itself on tiny Llama models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cfmlang
from cfmlang.diagnostics import CompileError
from cfmlang.ops.lora.combine import SUMMARIES
from models import peft_adapter, tiny_model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_zoo")
    base = tiny_model(root / "base", seed=3)
    return {
        "base": base,
        "wide": tiny_model(root / "wide", seed=4, hidden_size=64),
        "a": peft_adapter(root / "a", base, seed=1),
        "b": peft_adapter(root / "b", base, seed=2, targets=("q_proj", "k_proj", "up_proj")),
        "c": peft_adapter(root / "c", base, seed=5, r=2, targets=("v_proj", "down_proj")),
        "rslora": peft_adapter(root / "rslora", base, seed=6, r=8, use_rslora=True),
        "patterns": peft_adapter(root / "patterns", base, seed=7, targets=("q_proj", "v_proj", "o_proj"),
                                 rank_pattern={"q_proj": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 3}),
    }


def peft_model(zoo, *names):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["base"]), zoo[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(zoo[name], adapter_name=name)
    return model


def program(zoo, *adapters, tail: str) -> str:
    lines = [f'model base:\n  source: hf "{zoo["base"]}"']
    lines += [f'brick {a}:\n  kind: lora\n  source: peft "{zoo[a]}"\n  base: base' for a in adapters]
    return "\n".join(lines) + "\n" + tail


@pytest.mark.parametrize("adapter", ["a", "rslora", "patterns"])
def test_fused_model_equals_peft_merge_and_unload(zoo, adapter, tmp_path):
    source = program(zoo, adapter, tail=f"model fused:\n  from: base\n  attach: [{adapter}]\noutput: fused\n")
    result = cfmlang.compile(source, tmp_path / "fused")
    ours = load_file(tmp_path / "fused" / "model.safetensors")
    theirs = peft_model(zoo, adapter).merge_and_unload().state_dict()
    changed = 0
    for name, tensor in ours.items():
        assert (tensor - theirs[name]).abs().max() <= 1e-5, name
        changed += not torch.equal(tensor, load_file(zoo["base"] / "model.safetensors")[name])
    assert changed == 4 * (3 if adapter == "patterns" else 2)      # the targets of four layers
    assert result.manifest["nodes"]["fused"]["op"] == "attach"
    ids = torch.tensor([[1, 7, 9, 30]])
    with torch.no_grad():
        torch.testing.assert_close(result.module(ids).logits, peft_model(zoo, adapter)(ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_a_peft_brick_compiles_to_its_own_adapter(zoo, tmp_path):
    cfmlang.compile(program(zoo, "patterns", tail="output: patterns\n"), tmp_path / "copy")
    ours = load_file(tmp_path / "copy" / "adapter_model.safetensors")
    theirs = load_file(zoo["patterns"] / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    reloaded = cfmlang.load(tmp_path / "copy")             # a PeftModel over the base
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, peft_model(zoo, "patterns")(ids).logits)


RANDOM = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")


@pytest.mark.parametrize("combination", sorted(SUMMARIES))
def test_every_combination_equals_peft_add_weighted_adapter(zoo, combination, tmp_path):
    """Deterministic methods at density 0.6; DARE at density 1 (PEFT draws its masks from
    the global RNG after its own initialisation draws, so masks are compared below, in
    test_dare_masks_follow_peft)."""
    from peft import get_peft_model_state_dict

    weights = {"a": 0.7, "b": -0.4}
    density = None if combination in ("cat", "linear", "svd") else 1.0 if combination in RANDOM else 0.6
    extra = "" if density is None else f"  density: {density}\n"
    tail = (f"merge m:\n  method: {combination}\n  inputs: {{a: {{weight: 0.7}}, b: {{weight: -0.4}}}}\n"
            f"{extra}  majority_sign_method: frequency\n  seed: 11\noutput: m\n")
    cfmlang.compile(program(zoo, "a", "b", tail=tail), tmp_path / "m")
    ours = load_file(tmp_path / "m" / "adapter_model.safetensors")
    model = peft_model(zoo, "a", "b")
    model.add_weighted_adapter(list(weights), list(weights.values()), "m", combination_type=combination,
                               density=density, majority_sign_method="frequency")
    theirs = get_peft_model_state_dict(model, adapter_name="m")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        assert (ours[name] - theirs[name]).abs().max() <= 1e-6, name
    assert any(ours[n].abs().sum() > 0 for n in ours)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_masks_follow_peft(method):
    """Given the same random stream, cfmlang's DARE equals PEFT's merge_utils exactly."""
    from peft.utils import merge_utils

    from cfmlang.ops.lora.combine import mix

    tensors = [torch.randn(6, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    weights = torch.tensor([0.5, -0.3, 0.9])
    ours = mix(method, tensors, weights, {"density": 0.4, "majority_sign_method": "total"},
               torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    extra = {"majority_sign_method": "total"} if method == "dare_ties" else {}
    theirs = getattr(merge_utils, method)(tensors, weights, 0.4, **extra)
    assert torch.equal(ours, theirs)


def test_dare_merges_are_seeded(zoo, tmp_path):
    def merged(seed: int, name: str) -> dict[str, torch.Tensor]:
        tail = f"merge m:\n  method: dare_linear\n  inputs: [a, b]\n  weight: 1.0\n  density: 0.5\n  seed: {seed}\noutput: m\n"
        cfmlang.compile(program(zoo, "a", "b", tail=tail), tmp_path / name)
        return load_file(tmp_path / name / "adapter_model.safetensors")

    first, again, other = merged(1, "first"), merged(1, "again"), merged(2, "other")
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)
    only_a = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"     # b has no v_proj
    kept = (first[only_a] != 0).float().mean()
    assert 0.35 < kept < 0.65                              # density 0.5 of one input's factor


def test_cat_and_svd_of_different_ranks(zoo, tmp_path):
    """cat concatenates ranks 4 + 2; svd_rank and svd_clamp cut a rank-3 clamped result."""
    from peft import get_peft_model_state_dict

    for combination, options, peft_options in [("cat", "", {}),
                                               ("svd", "  svd_rank: 3\n  svd_clamp: 0.9\n",
                                                {"svd_rank": 3, "svd_clamp": 0.9})]:
        tail = f"merge m:\n  method: {combination}\n  inputs: [a, c]\n  weight: 0.5\n{options}output: m\n"
        cfmlang.compile(program(zoo, "a", "c", tail=tail), tmp_path / combination)
        ours = load_file(tmp_path / combination / "adapter_model.safetensors")
        model = peft_model(zoo, "a", "c")
        model.add_weighted_adapter(["a", "c"], [0.5, 0.5], "m", combination_type=combination, **peft_options)
        theirs = get_peft_model_state_dict(model, adapter_name="m")
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0)
        a_name = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
        assert ours[a_name].shape[0] == (6 if combination == "cat" else 3)


def test_a_merged_adapter_attaches(zoo, tmp_path):
    tail = ("merge m:\n  method: cat\n  inputs: {a: {weight: 1.0}, c: {weight: 1.0}}\n"
            "model fused:\n  from: base\n  attach: [m]\noutput: fused\n")
    cfmlang.compile(program(zoo, "a", "c", tail=tail), tmp_path / "fused")
    ours = load_file(tmp_path / "fused" / "model.safetensors")
    model = peft_model(zoo, "a", "c")
    model.base_model.set_adapter(["a", "c"])               # both active: the sum of deltas
    theirs = model.merge_and_unload().state_dict()
    assert max((ours[n] - theirs[n]).abs().max() for n in ours) <= 1e-5


def diagnostics(source: str) -> list[tuple[str, int, str]]:
    with pytest.raises(CompileError) as info:
        cfmlang.check(source)
    return [(d.code, d.span.line if d.span else 0, d.message) for d in info.value.diagnostics]


def test_adapter_that_does_not_fit_the_base(zoo):
    source = f'model wide:\n  source: hf "{zoo["wide"]}"\nbrick a:\n  kind: lora\n  source: peft "{zoo["a"]}"\n  base: wide\n'
    [(code, line, message)] = diagnostics(source)
    assert (code, line) == ("E151", 5)
    assert "model.layers.0.self_attn.q_proj.lora_A" in message and "[4, 64]" in message


def test_adapter_module_missing_from_the_base(zoo, tmp_path):
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "renamed"
    shutil.copytree(zoo["a"], broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    save_file({k.replace("layers.2.self_attn.v_proj", "layers.2.self_attn.vproj"): v for k, v in tensors.items()},
              broken / "adapter_model.safetensors")
    source = program({**zoo, "a": broken}, "a", tail="")
    [(code, _, message)] = diagnostics(source)
    assert code == "E150" and "`model.layers.2.self_attn.vproj`" in message


def test_merges_and_attachments_are_checked(zoo):
    mixed = program(zoo, "a", "c", tail="merge m:\n  method: linear\n  inputs: [a, c]\n  weight: 1.0\n")
    [(code, line, message)] = diagnostics(mixed)
    assert code == "E156" and "a: 4, c: 2" in message
    with_model = program(zoo, "a", tail="merge m:\n  method: cat\n  inputs: [a, base]\n  weight: 1.0\n")
    assert [d[0] for d in diagnostics(with_model)] == ["E154"]
    no_density = program(zoo, "a", "b", tail="merge m:\n  method: ties\n  inputs: [a, b]\n  weight: 1.0\n")
    assert [d[0] for d in diagnostics(no_density)] == ["E014"]
    bad_method = program(zoo, "a", "b", tail="merge m:\n  method: slerp\n  inputs: [a, b]\n")
    assert [d[0] for d in diagnostics(bad_method)] == ["E030"]
    attach_model = program(zoo, "a", tail="model f:\n  from: base\n  attach: [base]\n")
    assert [d[0] for d in diagnostics(attach_model)] == ["E154"]


@pytest.fixture(scope="module")
def talker(tmp_path_factory) -> Path:
    """A tiny model with a real (word-level) tokenizer, and a data file beside it."""
    from models import tiny_tokenizer

    root = tmp_path_factory.mktemp("talker")
    tiny_tokenizer(tiny_model(root / "base", seed=9))
    lines = [f'{{"prompt": "a {word}", "response": "the sea sky {word} verse"}}' for word in
             ("poem", "story", "sum", "loop", "code", "rhyme")]
    (root / "pirate.jsonl").write_text("\n".join(lines) + "\n")
    return root


TRAIN = """model base:
  source: hf "base"
brick tone:
  kind: lora
  base: base
  train: {data: "pirate.jsonl", steps: 12, rank: 4, lr: 0.08, seed: 3, batch_size: 3, targets: [q_proj, v_proj, up_proj]}
"""


def test_training_a_brick_is_deterministic_and_learns(talker):
    (talker / "train.brick").write_text(TRAIN + "output: tone\n")
    steps = []
    first = cfmlang.compile(talker / "train.brick", talker / "out1",
                            on_train_step=lambda name, step, total, loss: steps.append((name, step, total)))
    cfmlang.compile(talker / "train.brick", talker / "out2", use_cache=False)      # trains again
    assert steps[0] == ("tone", 1, 12) and steps[-1] == ("tone", 12, 12)
    one, two = (load_file(talker / d / "adapter_model.safetensors") for d in ("out1", "out2"))
    assert len(one) == 2 * 3 * 4 and all(torch.equal(one[k], two[k]) for k in one)
    losses = first.manifest["adapter"]["loss"]
    assert len(losses) == 12 and sum(losses[:3]) - sum(losses[-3:]) > 0.5   # nats, over three steps
    curve = (talker / "out1" / "loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 13
    assert first.manifest["adapter"]["samples"] == 6 and first.manifest["nodes"]["tone"]["samples"] == 6


def test_a_trained_brick_is_reused_by_another_program(talker):
    """A trained brick's artifact is a PEFT directory: a second program reads it back as
    `peft "..."` and fuses it like PEFT's merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (talker / "trained.brick").write_text(TRAIN + "output: tone\n")
    cfmlang.compile(talker / "trained.brick", talker / "tone")
    (talker / "reuse.brick").write_text('model base:\n  source: hf "base"\nbrick tone:\n  kind: lora\n'
                                        '  source: peft "tone"\n  base: base\n'
                                        "model fused:\n  from: base\n  attach: [tone]\noutput: fused\n")
    cfmlang.compile(talker / "reuse.brick", talker / "fused")
    fused = load_file(talker / "fused" / "model.safetensors")
    peft_fused = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(talker / "base"), talker / "tone")
    theirs = peft_fused.merge_and_unload().state_dict()
    assert max((fused[k] - theirs[k]).abs().max() for k in fused) <= 1e-5
    base = load_file(talker / "base" / "model.safetensors")
    assert sum(not torch.equal(fused[k], base[k]) for k in fused) == 3 * 4


def test_training_inside_a_fused_model(talker):
    """The training brick can feed a model directly; same weights as the two-step route."""
    (talker / "direct.brick").write_text(TRAIN + "model fused:\n  from: base\n  attach: [tone]\noutput: fused\n")
    cfmlang.compile(talker / "direct.brick", talker / "direct", use_cache=False)
    cfmlang.compile(talker / "trained.brick", talker / "tone2")
    (talker / "reuse2.brick").write_text((talker / "reuse.brick").read_text().replace('"tone"', '"tone2"'))
    cfmlang.compile(talker / "reuse2.brick", talker / "via_peft")
    direct, via_peft = (load_file(talker / d / "model.safetensors") for d in ("direct", "via_peft"))
    assert all(torch.equal(direct[k], via_peft[k]) for k in direct)


def test_training_data_diagnostics(talker):
    (talker / "bad.jsonl").write_text('{"text": "fine"}\n{"prompt": "no response"}\n')
    source = TRAIN.replace("pirate.jsonl", "bad.jsonl")
    (talker / "bad.brick").write_text(source)
    [(code, line, message)] = diagnostics(talker / "bad.brick")
    assert (code, line) == ("E153", 6) and "bad.jsonl:2" in message
    (talker / "missing.brick").write_text(TRAIN.replace("pirate.jsonl", "nowhere.txt"))
    assert [d[0] for d in diagnostics(talker / "missing.brick")] == ["E153"]


def test_factorwise_merge_refuses_unequal_module_ranks():
    """Configs may agree on r while modules differ (extraction with a threshold): the
    executor reports it (E080) instead of failing inside torch.stack."""
    from cfmlang.ops.lora.factors import LoraAdapter, LoraFactors
    from cfmlang.ops.lora.combine import combine

    config = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}
    a = LoraAdapter({"m.q_proj": LoraFactors(torch.ones(4, 8), torch.ones(8, 4), 1.0)}, config)
    b = LoraAdapter({"m.q_proj": LoraFactors(torch.ones(2, 8), torch.ones(8, 2), 1.0)}, config)
    with pytest.raises(ValueError, match="equal ranks"):
        combine([a, b], [1.0, 1.0], "linear", {"majority_sign_method": "total"}, 0)
    merged = combine([a, b], [1.0, 1.0], "cat", {}, 0)
    torch.testing.assert_close(merged.modules["m.q_proj"].delta(), torch.full((8, 8), 6.0))


def test_a_trained_brick_is_cached_and_not_trained_again(talker, tmp_path):
    """Changing only `output:` after a compile that trained a brick restores the brick
    from the cache: no training step runs, and the adapter and its report are those a
    fresh training gives."""
    fused = TRAIN + "model fused:\n  from: base\n  attach: [tone]\n"
    cache, steps = tmp_path / "cache", []

    def compile_(text, out, **options):
        (talker / "cached.brick").write_text(text)
        return cfmlang.compile(talker / "cached.brick", tmp_path / out, on_train_step=lambda *step: steps.append(step),
                               **options)

    compile_(fused + "output: fused\n", "fused", cache_dir=cache)
    assert len(steps) == 12
    (talker / "cached.brick").write_text(fused + "output: tone\n")
    assert cfmlang.plan(talker / "cached.brick", cache_dir=cache).node("tone").status == "cached"
    cached = compile_(fused + "output: tone\n", "tone", cache_dir=cache)
    assert len(steps) == 12 and "tone" not in cached.stats          # no step ran the second time
    trained = compile_(fused + "output: tone\n", "fresh", use_cache=False)
    assert len(steps) == 24
    one, two = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("tone", "fresh"))
    assert len(one) == 2 * 3 * 4 and all(torch.equal(one[k], two[k]) for k in one)
    assert cached.manifest["adapter"] == trained.manifest["adapter"] and len(cached.manifest["adapter"]["loss"]) == 12
    assert (tmp_path / "tone" / "loss.csv").read_text() == (tmp_path / "fresh" / "loss.csv").read_text()
    # the restored brick attaches exactly as the trained one did
    again = compile_(fused + "model twice:\n  from: base\n  attach: [tone]\noutput: twice\n", "twice", cache_dir=cache)
    assert len(steps) == 24 and "tone" not in again.stats
    first, second = (load_file(tmp_path / d / "model.safetensors") for d in ("fused", "twice"))
    assert all(torch.equal(first[k], second[k]) for k in first)
