"""`route` over lora bricks (retrieve, gate): checked, compiled to base + adapters +
router, loaded as an AdapterMixture, and compared with PEFT on a tiny Llama."""
from __future__ import annotations

import json

import pytest
import torch
from models import tiny_model, tiny_tokenizer
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import cfmlang
from cfmlang.diagnostics import CompileError
from cfmlang.runtime.run import generate

SAMPLES = {"math": ["prove the equation", "add a number to the sum"],
           "poem": ["a poem of love", "verse and rhyme at night"]}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    base = tiny_model(root / "base", seed=4)
    tiny_tokenizer(base)
    found = {"base": base}
    for seed, (name, targets) in enumerate((("math", ["q_proj", "v_proj"]), ("poem", ["gate_proj", "down_proj"]))):
        torch.manual_seed(40 + seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        model.save_pretrained(root / name)
        found[name] = root / name
    (root / "mix.txt").write_text(" ".join(SAMPLES["math"] * 20 + SAMPLES["poem"] * 5))
    found["data"] = root / "mix.txt"
    return found


def program(zoo, route: str) -> str:
    return (f'model base:\n  source: hf "{zoo["base"]}"\n'
            f'brick math:\n  kind: lora\n  source: peft "{zoo["math"]}"\n  base: base\n'
            f'brick poem:\n  kind: lora\n  source: peft "{zoo["poem"]}"\n  base: base\n'
            f"{route}output: pick\n")


RETRIEVE = ('route pick:\n  method: retrieve\n  base: base\n  inputs:\n'
            '    math: {samples: ["prove the equation", "add a number to the sum"]}\n'
            '    poem: {samples: ["a poem of love", "verse and rhyme at night"]}\n  top_k: 1\n')


def compiled(zoo, tmp_path, route: str, use_cache: bool = True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "route.brick"
    path.write_text(program(zoo, route))
    cfmlang.compile(path, tmp_path / "out", use_cache=use_cache)
    return tmp_path / "out"


@pytest.mark.parametrize("embed_layers", [None, 1])
def test_retrieve_picks_by_samples_and_equals_the_peft_adapter(zoo, tmp_path, embed_layers):
    route = RETRIEVE + (f"  embed_layers: {embed_layers}\n" if embed_layers else "")
    out = compiled(zoo, tmp_path, route)
    manifest = json.loads((out / "cfm.json").read_text())
    assert manifest["kind"] == "adapter-routed" and manifest["routing"]["adapters"] == ["math", "poem"]
    assert manifest["routing"]["embed_layers"] == embed_layers
    mixture = cfmlang.load(out)
    assert mixture.embed_layers == embed_layers
    tokenizer = AutoTokenizer.from_pretrained(out)
    for name, prompts in SAMPLES.items():
        ids = tokenizer(prompts[1], return_tensors="pt")["input_ids"]
        assert mixture.chosen(ids) == [[name]]
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["base"]), zoo[name]).eval()
        with torch.no_grad():
            assert (mixture(ids).logits - peft(input_ids=ids).logits).abs().max() < 1e-5, name
    assert isinstance(generate(out, "add a number", max_new_tokens=3, chat=False), str)


def test_trained_gates_lower_the_loss_on_their_text(zoo, tmp_path):
    route = (f'route pick:\n  method: gate\n  base: base\n  inputs: [math, poem]\n  top_k: 2\n'
             f'  train: {{data: "{zoo["data"]}", steps: 12, lr: 0.05, max_length: 8}}\n')
    out = compiled(zoo, tmp_path, route)
    training = json.loads((out / "cfm.json").read_text())["routing"]["gate_training"]
    assert len(training["loss_curve"]) == 12 and training["loss_after"] < training["loss_before"]
    mixture = cfmlang.load(out)
    gates = [g.weight for g in mixture.gates]
    assert any(g.abs().max() > 0 for g in gates)          # trained, stored and reloaded
    again = compiled(zoo, tmp_path / "again", route, use_cache=False)      # trained afresh
    assert (out / "router.safetensors").read_bytes() == (again / "router.safetensors").read_bytes()


@pytest.mark.parametrize("route, code, words", [
    (RETRIEVE.replace("top_k: 1", "top_k: 3"), "E159", "exceeds the 2 adapters"),
    (RETRIEVE + "  embed_layers: 99\n", "E159", "`embed_layers: 99` exceeds the base's"),
    (RETRIEVE.replace('{samples: ["a poem of love", "verse and rhyme at night"]}', "{}"), "E014", "missing parameter `samples`"),
    ('route pick:\n  method: gate\n  base: base\n  inputs: [math, base]\n', "E154", "`base` is not a lora brick"),
    ('route pick:\n  method: gate\n  base: base\n  inputs: [math]\n', "E032", "at least two"),
    ('route pick:\n  method: gate\n  inputs: [math, poem]\n', "E014", "needs `base:`"),
    ('route pick:\n  method: gate\n  base: base\n  inputs: [math, poem]\n  train: {data: "nope.txt"}\n',
     "E153", "no such file"),
])
def test_route_errors(zoo, tmp_path, route, code, words):
    path = tmp_path / "bad.brick"
    path.write_text(program(zoo, route))
    with pytest.raises(CompileError) as exc:
        cfmlang.check(path)
    problems = exc.value.diagnostics
    assert [p.code for p in problems] == [code], problems
    assert words in problems[0].message
