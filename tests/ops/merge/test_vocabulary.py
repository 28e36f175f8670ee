"""Merges of models whose vocabularies differ (`tokenizer:`), against mergekit 0.1.5's
`tokenizer_source` / `tokenizer:` on tiny models with real tokenizers (a word-level one
and a BPE one, each with its own added tokens), and chat templates written into the
output's tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cfmlang
from cfmlang.diagnostics import CompileError
from mergekit_oracle import run_mergekit, tensors
from models import tiny_model

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TEXT = ("the cat sat on the mat while the dog ran to the park and the bird sang a song "
        "about the sea and the sky at night").split()


def _save(core, folder: Path, added) -> int:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.add_tokens(added)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def word_tokenizer(folder: Path, words: list[str], added) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return _save(core, folder, added)


def bpe_tokenizer(folder: Path, vocab_size: int, added) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator([" ".join(TEXT)] * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                                       show_progress=False))
    return _save(core, folder, added)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """a: word-level, with `<|im_start|>` (special) and `<tool>` (lstrip) added; b: BPE
    over letters and merges, with `<|im_start|>` and `<think>` (special, not
    normalized) added; c: word-level sharing a's first words, with a chat template."""
    from tokenizers import AddedToken

    root = tmp_path_factory.mktemp("vocab")
    sizes = {
        "a": word_tokenizer(root / "a", sorted(set(TEXT)) + [f"x{i}" for i in range(8)],
                            [AddedToken("<|im_start|>", special=True), AddedToken("<tool>", lstrip=True)]),
        "b": bpe_tokenizer(root / "b", 60, [AddedToken("<|im_start|>", special=True),
                                            AddedToken("<think>", special=True, normalized=False)]),
        "c": word_tokenizer(root / "c", sorted(set(TEXT))[:10] + [f"y{i}" for i in range(6)], []),
    }
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    config = json.loads((root / "c" / "tokenizer_config.json").read_text())
    (root / "c" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    for seed, (name, size) in enumerate(sizes.items()):
        tiny_model(root / name, seed=40 + seed, vocab_size=size)
    return {name: root / name for name in sizes}


def run_both(zoo, tmp_path, brick: str, mergekit: dict) -> tuple[Path, Path]:
    ours = tmp_path / "ours"
    cfmlang.compile(brick.format(**{k: str(v) for k, v in zoo.items()}), ours)
    theirs = tmp_path / "mk"
    run_mergekit({**mergekit, "dtype": "float32"}, theirs)
    return ours, theirs


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def assert_same_merge(ours: Path, theirs: Path, base_tokens: int):
    """The same tokens, the base's tokens at the same ids, the same added tokens with the
    same attributes, the same special tokens, and for every token the same rows (mergekit
    numbers the tokens it adds in hash order, so rows are compared by token)."""
    vocab, their_vocab = _vocab(ours), _vocab(theirs)
    assert set(vocab) == set(their_vocab)
    assert len(vocab) >= base_tokens
    for token, i in their_vocab.items():
        if i < base_tokens:
            assert vocab[token] == i, token
    added = {e["content"]: {k: v for k, v in e.items() if k != "id"}
             for e in json.loads((ours / "tokenizer.json").read_text())["added_tokens"]}
    their_added = {e["content"]: {k: v for k, v in e.items() if k != "id"}
                   for e in json.loads((theirs / "tokenizer.json").read_text())["added_tokens"]}
    assert added == their_added
    settings = json.loads((ours / "tokenizer_config.json").read_text())
    their_settings = json.loads((theirs / "tokenizer_config.json").read_text())
    assert settings == their_settings
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == \
        json.loads((theirs / "config.json").read_text())["vocab_size"]
    mine, other = tensors(ours), tensors(theirs)
    assert set(mine) == set(other)
    for name, value in mine.items():
        assert value.shape == other[name].shape, name
        if value.shape[0] != len(vocab) and value.shape[0] == other[name].shape[0] and name != "lm_head.weight" \
                and "embed" not in name:
            assert torch.equal(value, other[name]), name
            continue
        for token, i in vocab.items():
            assert torch.equal(value[i], other[name][their_vocab[token]]), (name, token)
        assert torch.equal(value[len(vocab):], other[name][len(vocab):]), name


UNION = """
model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
merge mix:
  method: task_arithmetic
  base: a
  inputs:
    b: {{weight: 0.7}}
  tokenizer: union
output: mix
"""


def test_union_equals_mergekit(zoo, tmp_path):
    ours, theirs = run_both(zoo, tmp_path, UNION, {
        "merge_method": "task_arithmetic", "base_model": str(zoo["a"]),
        "models": [{"model": str(zoo["b"]), "parameters": {"weight": 0.7}}], "tokenizer_source": "union"})
    base_tokens = len(_vocab(zoo["a"]))
    assert_same_merge(ours, theirs, base_tokens)
    vocab = _vocab(ours)
    assert {"<think>", "<tool>", "<|im_start|>"} <= set(vocab)
    merged, a, b = tensors(ours), tensors(zoo["a"]), tensors(zoo["b"])
    name = "model.embed_tokens.weight"
    think = _vocab(zoo["b"])["<think>"]   # only b has it: every input takes b's row
    torch.testing.assert_close(merged[name][vocab["<think>"]], b[name][think])
    cat = vocab["cat"]   # in both: task arithmetic of the two rows
    expected = a[name][_vocab(zoo["a"])["cat"]] + 0.7 * (b[name][_vocab(zoo["b"])["cat"]] - a[name][_vocab(zoo["a"])["cat"]])
    torch.testing.assert_close(merged[name][cat], expected)
    special = json.loads((ours / "tokenizer.json").read_text())["added_tokens"]
    assert next(e for e in special if e["content"] == "<think>")["normalized"] is False
    assert next(e for e in special if e["content"] == "<tool>")["lstrip"] is True
    assert json.loads((ours / "cfm.json").read_text())["nodes"]["mix"]["tokenizer"]["vocab_size"] == len(vocab)


LINEAR = """
model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
model c:
  source: hf "{c}"
merge mix:
  method: linear
  inputs:
    a: {{weight: 0.2}}
    b: {{weight: 0.5}}
    c: {{weight: 0.3}}
  tokenizer: {tokenizer}
output: mix
"""


@pytest.mark.parametrize("source", ["b", "union_tokens"])
def test_named_source_and_token_rules_equal_mergekit(zoo, tmp_path, source):
    """A named input's tokenizer; the union with per-token rules (a model's row, zeros,
    another token's row, forced) and padding; three inputs, no base (tokens two inputs
    share are averaged)."""
    models = [{"model": str(zoo[n]), "parameters": {"weight": w}} for n, w in (("a", 0.2), ("b", 0.5), ("c", 0.3))]
    if source == "b":
        brick, config = "b", {"tokenizer_source": str(zoo["b"])}
        base_tokens = len(_vocab(zoo["b"]))
    else:
        brick = ('{{source: a, pad_to_multiple_of: 16, tokens: {{"<tool>": {{source: b}}, "sat": {{source: {{kind: zero}}, force: true}},'
                 ' "<new>": {{source: {{kind: model_token, model: c, token: "<s>"}}}},'
                 ' "the": {{source: {{kind: model_token, model: b, token_id: 5}}, force: true}}}}}}')
        config = {"tokenizer": {"source": str(zoo["a"]), "pad_to_multiple_of": 16, "tokens": {
            "<tool>": {"source": str(zoo["b"])}, "sat": {"source": {"kind": "zero"}, "force": True},
            "<new>": {"source": {"kind": "model_token", "model": str(zoo["c"]), "token": "<s>"}},
            "the": {"source": {"kind": "model_token", "model": str(zoo["b"]), "token_id": 5}, "force": True}}}}
        base_tokens = len(_vocab(zoo["a"]))
    if source == "b":
        ours, theirs = run_both(zoo, tmp_path, LINEAR.replace("{tokenizer}", brick), {
            "merge_method": "linear", "models": models, **config})
        assert_same_merge(ours, theirs, base_tokens)
        return
    # mergekit breaks a rule naming `<tool>` from b, which lacks it (an assertion); so
    # b's rule is checked here and the oracle runs without it
    with pytest.raises(CompileError) as info:
        cfmlang.check(LINEAR.replace("{tokenizer}", brick).format(**{k: str(v) for k, v in zoo.items()}))
    assert [d.code for d in info.value.diagnostics] == ["E292"]
    brick = brick.replace('"<tool>": {{source: b}}, ', "")
    del config["tokenizer"]["tokens"]["<tool>"]
    ours, theirs = run_both(zoo, tmp_path, LINEAR.replace("{tokenizer}", brick), {
        "merge_method": "linear", "models": models, **config})
    assert_same_merge(ours, theirs, base_tokens)
    vocab, merged = _vocab(ours), tensors(ours)
    assert len(vocab) % 16 and merged["model.embed_tokens.weight"].shape[0] % 16 == 0
    assert torch.equal(merged["model.embed_tokens.weight"][vocab["sat"]], torch.zeros(32))
