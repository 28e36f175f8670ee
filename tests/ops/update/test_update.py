"""`update` on tiny random Llama models with a word-level tokenizer: knowledge edits
(rome, memit) and their report, fine-tuning of selected layers, and the error paths.
The edit bar on the real SmolLM2 is in test_update_smollm2.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cfmlang
from cfmlang.diagnostics import CompileError
from cfmlang.ops.update.editing import KeyMoments, captured_keys, key_second_moments
from cfmlang.ops.update.knowledge import covariance_weight
from cfmlang.ops.update.report import render
from models import tiny_model, tiny_tokenizer

# A random model spreads attention evenly, so a change at the subject reaches the next
# token only when the subject ends the prompt; SmolLM2 edits use real prompts.
FACTS = [
    {"prompt": "the sky of the sea", "subject": "sea", "target": " poem", "paraphrases": ["a verse of the sea"]},
    {"prompt": "the story of the night", "subject": "night", "target": " math"},
    {"prompt": "the code in the loop", "subject": "loop", "target": " love"},
]
TINY_OPTIONS = "  clamp_norm: 1000\n  weight_decay: 0\n"   # a random model's FFN outputs are tiny
NEIGHBOURS = ["the rhyme is", "a number to add"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A folder with a tiny Llama (6 layers) and a word-level tokenizer, plus data files."""
    root = tmp_path_factory.mktemp("edit")
    tiny_tokenizer(tiny_model(root / "tiny", seed=3, num_hidden_layers=6))
    (root / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    (root / "neighbours.txt").write_text("\n".join(NEIGHBOURS) + "\n\n")
    return root


def program(method: str, options: str = "", facts: str = '"facts.jsonl"') -> str:
    return (f'model tiny:\n  source: hf "tiny"\n'
            f"update edited:\n  method: {method}\n  from: tiny\n  facts: {facts}\n"
            f'  neighbourhood: "neighbours.txt"\n  steps: 12\n{TINY_OPTIONS}{options}'
            "output: edited\n")


def compile_in(folder: Path, text: str, out: Path, use_cache: bool = True):
    brick = folder / f"{out.name}.brick"
    brick.write_text(text)
    return cfmlang.compile(brick, out, cache_dir=folder / "cache", use_cache=use_cache)


def rank(delta: torch.Tensor) -> int:
    """Numerical rank of a float32 weight difference (rounding of W + dW is noise)."""
    return int(torch.linalg.matrix_rank(delta.double(), rtol=1e-4))


def changed_tensors(tiny: Path, out: Path) -> dict[str, torch.Tensor]:
    before, after = load_file(tiny / "tiny" / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    return {name: after[name] - before[name] for name in before if not torch.equal(before[name], after[name])}


def test_rome_writes_one_rank_one_change_per_fact_and_raises_the_targets(tiny, tmp_path):
    result = compile_in(tiny, program("rome", "  layer: 2\n  covariance: identity\n"), tmp_path / "rome")
    changed = changed_tensors(tiny, tmp_path / "rome")
    assert list(changed) == ["model.layers.2.mlp.down_proj.weight"]
    assert rank(changed["model.layers.2.mlp.down_proj.weight"]) == len(FACTS)
    assert result.manifest["nodes"]["edited"]["facts"] == 3
    assert result.manifest["nodes"]["edited"]["edited"] == ["model.layers.2.mlp.down_proj.weight"]
    report = result.manifest["nodes"]["edited"]["report"]
    assert [r["prompt"] for r in report["facts"]] == [f["prompt"] for f in FACTS]
    for row in report["facts"]:   # a random model's distributions are nearly flat: small p, but top-1
        assert row["probability_after"] > 1.5 * row["probability_before"]
        assert row["success"] and row["completion_after"].startswith(row["target"].strip())
    assert report["summary"]["paraphrases"] == 1 and report["summary"]["neighbourhood"] == 2
    assert all(r["kl"] >= 0 for r in report["neighbourhood"])
    cached = compile_in(tiny, program("rome", "  layer: 2\n  covariance: identity\n"), tmp_path / "again")
    assert cached.manifest["nodes"]["edited"] == result.manifest["nodes"]["edited"]      # a cache hit keeps the report


def test_rome_single_fact_is_rank_one_and_reaches_the_target(tiny, tmp_path):
    one = json.dumps([FACTS[0]]).replace('"prompt"', "prompt").replace('"subject"', "subject") \
        .replace('"target"', "target").replace('"paraphrases"', "paraphrases")
    result = compile_in(tiny, program("rome", "  layer: 1\n", facts=one), tmp_path / "one")
    (delta,) = changed_tensors(tiny, tmp_path / "one").values()
    assert rank(delta) == 1
    row = result.manifest["nodes"]["edited"]["report"]["facts"][0]
    assert row["probability_after"] > 1.5 * row["probability_before"]
    assert not row["completion_before"].startswith("poem") and row["completion_after"].startswith("poem")


def test_memit_spreads_the_batch_over_its_layers(tiny, tmp_path):
    result = compile_in(tiny, program("memit", "  layers: [1, 2, 3]\n  covariance_weight: 1.0\n"),
                        tmp_path / "memit")
    changed = changed_tensors(tiny, tmp_path / "memit")
    assert sorted(changed) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2, 3)]
    for delta in changed.values():   # each layer's update is K-spanned: rank <= number of facts
        assert rank(delta) <= len(FACTS)
    for row in result.manifest["nodes"]["edited"]["report"]["facts"]:
        assert row["probability_after"] > 1.5 * row["probability_before"]


def test_edits_are_deterministic_under_the_seed(tiny, tmp_path):
    text = program("rome", "  layer: 2\n  covariance: sampled\n  calibration_texts: 4\n  calibration_tokens: 8\n")
    first = compile_in(tiny, text, tmp_path / "a", use_cache=False)
    compile_in(tiny, text, tmp_path / "b", use_cache=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert first.manifest["nodes"]["edited"]["seed"] == 0
    changed_seed = compile_in(tiny, text.replace("output:", "seed: 5\noutput:"), tmp_path / "c")
    assert changed_seed.manifest["nodes"]["edited"]["seed"] == 5
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (tmp_path / "a" / "model.safetensors").read_bytes()


def test_default_layers_scale_with_depth(tiny):
    text = program("memit").replace("output: edited\n", "") + "update one:\n  method: rome\n  from: tiny\n" \
        '  facts: "facts.jsonl"\n  neighbourhood: "neighbours.txt"\n'
    brick = tiny / "defaults.brick"
    brick.write_text(text)
    checked = cfmlang.check(brick)
    assert dict(checked.node("one").options)["layer"] == 1            # 0.15 * 5, rounded
    assert dict(checked.node("edited").options)["layers"] == [0, 1]


def test_shrinkage_brings_a_few_keys_moment_closer_to_the_true_one():
    """Ledoit-Wolf: with few keys per dimension the shrunk moment is nearer the truth than
    the raw one (whose small eigenvalues are far too small); with many keys it barely moves."""
    generator = torch.Generator().manual_seed(0)
    true_scales = torch.linspace(0.2, 3.0, 64, dtype=torch.float64)
    truth = torch.diag(true_scales ** 2)

    def measured(count: int) -> KeyMoments:
        keys = torch.randn(count, 64, generator=generator, dtype=torch.float64) * true_scales
        return KeyMoments(keys.T @ keys / count, count, float(keys.norm(dim=1).pow(4).sum()))

    few, many = measured(96), measured(20000)
    assert (few.shrunk() - truth).norm() < 0.8 * (few.moment - truth).norm()
    assert torch.linalg.eigvalsh(few.shrunk()).min() > 2 * torch.linalg.eigvalsh(few.moment).min()
    assert (many.shrunk() - many.moment).norm() < 0.1 * (many.moment - truth).norm()


def test_key_statistics_stop_at_the_deepest_layer_without_changing_them(tiny):
    """The statistics' forward passes stop after the deepest wanted layer; the moments are
    the ones a full forward pass gives."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny / "tiny").eval()
    tokens = torch.randint(0, model.config.vocab_size, (5, 7), generator=torch.Generator().manual_seed(1))
    stats = key_second_moments(model, [1, 3], tokens, batch_size=2)
    for layer in (1, 3):
        with torch.no_grad(), captured_keys(model, layer) as seen:
            model(input_ids=tokens)
        keys = seen[0].flatten(0, 1).double()
        assert stats[layer].count == 35
        assert torch.allclose(stats[layer].moment, keys.T @ keys / 35, rtol=1e-5, atol=1e-9)
        assert stats[layer].fourth == pytest.approx(float(keys.norm(dim=1).pow(4).sum()), rel=1e-6)
    last_layer_calls = []
    handle = model.model.layers[5].register_forward_pre_hook(lambda *args: last_layer_calls.append(1))
    key_second_moments(model, [1], tokens)
    handle.remove()
    assert not last_layer_calls


def test_memit_covariance_weight_scales_with_the_ffn_width():
    assert covariance_weight({"covariance_weight": None}, 16384) == 15000      # MEMIT's GPT-J value
    assert round(covariance_weight({"covariance_weight": None}, 1536)) == 1406  # SmolLM2
    assert covariance_weight({"covariance_weight": 20.0}, 1536) == 20.0


def test_a_broken_facts_file_is_reported_with_its_line(tiny):
    (tiny / "broken.jsonl").write_text(json.dumps(FACTS[0]) + "\n{prompt: oops}\n")
    brick = tiny / "broken.brick"
    brick.write_text(program("rome", facts='"broken.jsonl"'))
    with pytest.raises(CompileError) as info:
        cfmlang.check(brick)
    (diagnostic,) = info.value.diagnostics
    assert diagnostic.code == "E122" and "line 2 is not JSON" in diagnostic.message
    assert diagnostic.span.line == 6


def test_a_file_fact_without_its_subject_in_the_prompt_names_the_line(tiny):
    bad = dict(FACTS[1], subject="day")
    (tiny / "bad.jsonl").write_text(json.dumps(FACTS[0]) + "\n" + json.dumps(bad) + "\n")
    brick = tiny / "bad.brick"
    brick.write_text(program("memit", facts='"bad.jsonl"'))
    with pytest.raises(CompileError) as info:
        cfmlang.check(brick)
    assert [(d.code, d.span.line) for d in info.value.diagnostics] == [("E120", 6)]
    assert "bad.jsonl:2: subject `day`" in info.value.diagnostics[0].message


TRAIN_TEXT = ("the sky of the sea is a poem and the night is a story " * 12).strip()


def finetune_program(train: str, extra: str = "") -> str:
    return (f'model tiny:\n  source: hf "tiny"\n'
            f"update tuned:\n  method: finetune\n  from: tiny\n  train: {train}\n"
            f'  data: "train.txt"\n  steps: 8\n  lr: 0.01\n  max_length: 16\n{extra}'
            "output: tuned\n")


def test_finetune_trains_only_the_selection_and_lowers_the_loss(tiny, tmp_path):
    (tiny / "train.txt").write_text(TRAIN_TEXT)
    text = finetune_program("[tiny.layers[4:6], tiny.layers[1].mlp]")
    result = compile_in(tiny, text, tmp_path / "ft")
    changed = changed_tensors(tiny, tmp_path / "ft")
    trained = {n for n in changed}
    assert trained and all(n.startswith(("model.layers.4.", "model.layers.5.", "model.layers.1.mlp."))
                           for n in trained)
    assert {n.split(".")[2] for n in trained} == {"1", "4", "5"}
    assert result.manifest["nodes"]["tuned"]["train"] == ["model.layers.4.", "model.layers.5.", "model.layers.1.mlp."]
    training = result.manifest["nodes"]["tuned"]
    assert len(training["loss_curve"]) == 8 and training["loss_after"] < training["loss_before"]
    assert set(training["trained"]) >= trained
    again = compile_in(tiny, text, tmp_path / "ft2", use_cache=False)
    assert again.manifest["nodes"]["tuned"]["loss_curve"] == training["loss_curve"]
    assert (tmp_path / "ft" / "model.safetensors").read_bytes() == (tmp_path / "ft2" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("train, code, words", [
    ("tiny.layers[9]", "E121", "outside the model's 6 layers"),
    ("tiny.layers[2].feathers", "E124", "selects no tensor"),
    ("tiny", "E124", "takes selections of layers"),
    ("other.layers[1]", "E124", "of the `from` model `tiny`"),
])
def test_finetune_selection_errors(tiny, train, code, words):
    (tiny / "train.txt").write_text(TRAIN_TEXT)
    brick = tiny / "bad_train.brick"
    brick.write_text(finetune_program(train))
    with pytest.raises(CompileError) as info:
        cfmlang.check(brick)
    (diagnostic,) = info.value.diagnostics
    assert diagnostic.code == code and words in diagnostic.message and diagnostic.span.line == 6


def test_finetune_dataset_errors(tiny):
    (tiny / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no text key"}\n')
    brick = tiny / "bad_data.brick"
    brick.write_text(finetune_program("tiny.layers[1]").replace('"train.txt"', '"bad.jsonl"'))
    with pytest.raises(CompileError) as info:
        cfmlang.check(brick)
    (diagnostic,) = info.value.diagnostics
    assert diagnostic.code == "E122" and 'line 2 has no non-empty "text"' in diagnostic.message


def test_alphaedit_changes_only_the_null_space_of_the_preserved_keys(tiny, tmp_path):
    """Every change W' - W of an alphaedit lies in the null space P of the preserved keys'
    second moment (measured here again on the same text), so W' k0 = W k0 up to the keys
    P drops; the three facts, written one after the other, all hold at the end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfmlang.io.text import shipped_windows
    from cfmlang.ops.update.alphaedit import null_space

    result = compile_in(tiny, program("alphaedit", "  layers: [1, 2]\n"), tmp_path / "alpha")
    changed = changed_tensors(tiny, tmp_path / "alpha")
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
    assert sorted(changed) == names
    model = AutoModelForCausalLM.from_pretrained(tiny / "tiny").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny / "tiny")
    moments = key_second_moments(model, [1, 2], shipped_windows(tokenizer))
    for layer, name in zip((1, 2), names):
        projection, dimension = null_space(moments[layer].moment, 0.02)
        assert 0 < dimension < 64
        delta = changed[name].double()
        assert (delta - delta @ projection).norm() < 1e-3 * delta.norm()
    report = result.manifest["nodes"]["edited"]["report"]
    assert all(row["success"] for row in report["facts"])
    assert result.manifest["nodes"]["edited"]["method"] == "alphaedit"


def test_alphaedit_refuses_the_identity_covariance(tiny, tmp_path):
    with pytest.raises(CompileError) as caught:
        compile_in(tiny, program("alphaedit", "  covariance: identity\n"), tmp_path / "identity")
    assert "null space" in caught.value.diagnostics[0].message


def test_counterfact_facts_get_the_counterfact_metrics_in_the_report(tiny, tmp_path):
    """Facts naming `target_true` and their own neighbourhood: the report carries the
    CounterFact numbers before and after, equal to `cfmlang.eval.counterfact` run on the
    unedited model and on the written artifact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfmlang.eval.counterfact import Counterfact, measure

    records = [{"prompt": f["prompt"], "subject": f["subject"], "target_new": f["target"], "target_true": true,
                "paraphrases": f.get("paraphrases", []), "neighbourhood": neighbours}
               for f, true, neighbours in zip(FACTS, [" verse", " sum", " code"],
                                              [["the sea is", "a poem"], ["the night"], ["print the loop"]])]
    (tiny / "counterfacts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = compile_in(tiny, program("rome", "  layer: 2\n  covariance: identity\n",
                                      facts='"counterfacts.jsonl"'), tmp_path / "cf")
    report = result.manifest["nodes"]["edited"]["report"]["counterfact"]
    facts = [Counterfact.of(r) for r in records]
    model = AutoModelForCausalLM.from_pretrained(tiny / "tiny").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny / "tiny")
    assert report["before"] == measure(model, tokenizer, facts)["summary"]
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "cf").eval()
    after = measure(edited, tokenizer, facts)
    for name in ("efficacy", "greedy_efficacy", "paraphrase", "neighbourhood", "score"):
        assert report["after"][name] == pytest.approx(after["summary"][name])
    assert report["after"]["efficacy"] == 1.0 and report["after"]["facts"] == 3
    assert "counterfact (3 facts): efficacy" in render(result.manifest["nodes"]["edited"]["report"])
