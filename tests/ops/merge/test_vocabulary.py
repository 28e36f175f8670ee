"""Merges of models whose vocabularies differ (`tokenizer:`), against mergekit 0.1.5's
`tokenizer_source` / `tokenizer:` on tiny models with real tokenizers (a word-level one
and a BPE one, each with its own added tokens), and chat templates written into the
output's tokenizer."""
from __future__ import annotations

import json
import shutil
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
    # b's tokenizer on a model with 2 rows fewer: its added tokens are not part of it
    shutil.copytree(root / "b", root / "short", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    tiny_model(root / "short", seed=45, vocab_size=sizes["b"] - 2)
    return {name: root / name for name in [*sizes, "short"]}


def run_both(zoo, tmp_path, brick: str, mergekit: dict) -> tuple[Path, Path]:
    ours = tmp_path / "ours"
    cfmlang.compile(brick.replace("{short}", str(zoo["short"])).format(**{k: str(v) for k, v in zoo.items()}), ours)
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
    import yaml

    from cfmlang.importers.mergekit import translate

    config = {"merge_method": "task_arithmetic", "base_model": str(zoo["a"]),
              "models": [{"model": str(zoo["b"]), "parameters": {"weight": 0.7}}], "tokenizer_source": "union"}
    ours, theirs = run_both(zoo, tmp_path, UNION, config)
    imported = translate(yaml.safe_dump({**config, "dtype": "float32"}))
    assert "  tokenizer: union\n" in imported
    cfmlang.compile(imported, tmp_path / "imported")
    for name, value in tensors(tmp_path / "imported").items():
        assert torch.equal(value, tensors(ours)[name]), name
    assert (tmp_path / "imported" / "tokenizer.json").read_bytes() == (ours / "tokenizer.json").read_bytes()
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


def test_base_tokens_beyond_its_rows_are_dropped_as_in_mergekit(zoo, tmp_path):
    brick = UNION.replace('"{a}"', '"{short}"')
    ours, theirs = run_both(zoo, tmp_path, brick, {
        "merge_method": "task_arithmetic", "base_model": str(zoo["short"]),
        "models": [{"model": str(zoo["b"]), "parameters": {"weight": 0.7}}], "tokenizer_source": "union"})
    rows = json.loads((zoo["short"] / "config.json").read_text())["vocab_size"]
    assert_same_merge(ours, theirs, rows)
    vocab = _vocab(ours)
    assert vocab["<think>"] >= rows and "<tool>" not in vocab


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


def fill(text: str, zoo) -> str:
    for name, folder in zoo.items():
        text = text.replace("{" + name + "}", str(folder))
    return text


def diagnostics(zoo, text: str) -> list:
    with pytest.raises(CompileError) as info:
        cfmlang.check(fill(text, zoo))
    return info.value.diagnostics


MODELS = """
model a:
  source: hf "{a}"
model b:
  source: hf "{b}"
model c:
  source: hf "{c}"
"""


def test_vocabularies_differ_without_tokenizer(zoo):
    found = diagnostics(zoo, MODELS + "merge m:\n  method: linear\n  weight: 1\n  inputs: [a, b]\n")
    assert [d.code for d in found] == ["E060"] and "tokenizer: union" in found[0].help[0]


@pytest.mark.parametrize("setting, code, line, text", [
    ("tokenizer: d", "E290", 12, "not an input of this merge"),
    ('tokenizer: {source: union, tokens: {"cat": {source: d}}}', "E290", 12, "`d` is not an input"),
    ('tokenizer: {source: union, tokens: {"<think>": {source: a}}}', "E292", 12, "not in the vocabulary of `a`"),
    ('tokenizer: {source: union, tokens: {"<none>": {source: {kind: mean}}}}', "E292", 12, "no rows to average"),
    ('tokenizer: {source: union, tokens: {"x": {source: {kind: model_token, model: c, token: "zzz"}}}}',
     "E292", 12, "`zzz` is not in the vocabulary of `c`"),
    ('tokenizer: {source: union, tokens: {"x": {source: {kind: model_token, model: c, token_id: 900}}}}',
     "E292", 12, "beyond the"),
    ('tokenizer: {source: union, tokens: {"x": {source: {kind: average}}}}', "E032", 12, "needs `kind:`"),
    ("tokenizer: {source: union, pad_to_multiple_of: 0}", "E032", 12, "positive integer"),
    ("tokenizer: {sauce: union}", "E013", 12, "unknown key `sauce`"),
    ("tokenizer: union\n  chat_template: chatm", "E293", 13, "did you mean `chatml`"),
    ('tokenizer: union\n  chat_template: "missing.jinja"', "E293", 13, "does not exist"),
    ("tokenizer: union\n  chat_template: a", "E293", 13, "`a` has no chat template"),
])
def test_misuse_is_located(zoo, setting, code, line, text):
    found = diagnostics(zoo, MODELS + f"merge m:\n  method: linear\n  weight: 1\n  inputs: [a, b, c]\n  {setting}\n")
    assert [d.code for d in found] == [code], [d.message for d in found]
    assert found[0].span.line == line
    assert text in "\n".join((found[0].message,) + found[0].help)


def test_inputs_without_tokenizers_are_refused(zoo, tmp_path):
    bare = tiny_model(tmp_path / "bare", seed=9, vocab_size=40)
    found = diagnostics(zoo, MODELS + f'model bare:\n  source: hf "{bare}"\n'
                        "merge m:\n  method: linear\n  weight: 1\n  inputs: [a, bare]\n  tokenizer: union\n"
                        "merge n:\n  method: linear\n  weight: 1\n  inputs: [m, b]\n  tokenizer: union\n")
    assert [(d.code, d.span.line) for d in found] == [("E291", 14)]
    assert "has no tokenizer" in found[0].message and "save_pretrained" in found[0].help[0]
    found = diagnostics(zoo, MODELS + "merge m:\n  method: linear\n  weight: 1\n  inputs: [a, b]\n  tokenizer: union\n"
                        "merge n:\n  method: linear\n  weight: 1\n  inputs: [m, c]\n  tokenizer: union\n")
    assert [(d.code, d.span.line) for d in found] == [("E291", 17)]
    assert "not known before compiling" in found[0].message


def test_unreadable_tokenizer_is_located(zoo, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(zoo["c"], broken)
    (broken / "tokenizer.json").write_text("{not json")
    found = diagnostics(zoo, MODELS + f'model broken:\n  source: hf "{broken}"\n'
                        "merge m:\n  method: linear\n  weight: 1\n  inputs: [a, broken]\n  tokenizer: union\n")
    assert [(d.code, d.span.line) for d in found] == [("E294", 14)]


CHAT = MODELS + """
merge m:
  method: linear
  weight: 1
  inputs: [a, b, c]
  tokenizer: union
  chat_template: {template}
output: m
"""


@pytest.mark.parametrize("template", ["chatml", "c", "auto", "file"])
def test_chat_template_is_written_and_used_by_run(zoo, tmp_path, template):
    from transformers import AutoTokenizer

    from cfmlang.cli import main
    from cfmlang.ops.merge.chat_templates import CHATML
    from cfmlang.runtime.run import encode, load_tokenizer

    own = json.loads((zoo["c"] / "tokenizer_config.json").read_text())["chat_template"]
    if template == "file":
        (tmp_path / "t.jinja").write_text(CHATML)
        template = f'"{tmp_path / "t.jinja"}"'
    out = tmp_path / "out"
    cfmlang.compile(fill(CHAT.replace("{template}", template), zoo), out)
    expected = own if template in ("c", "auto") else CHATML
    tokenizer = load_tokenizer(out)
    assert tokenizer.chat_template == expected
    assert AutoTokenizer.from_pretrained(out).chat_template == expected
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == expected
    assert (out / "chat_template.jinja").read_text() == expected
    ids = encode(tokenizer, "the cat", chat=True)["input_ids"][0].tolist()
    rendered = ("[user] the cat\n" if expected == own else "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n")
    assert ids == tokenizer(rendered)["input_ids"]
    if template == "chatml":
        assert tokenizer.convert_ids_to_tokens(ids)[0] == "<|im_start|>"
        assert main(["run", str(out), "--prompt", "the cat", "--max-new-tokens", "3"]) == 0


def test_a_model_merged_alone_gets_a_template_and_keeps_its_weights(zoo, tmp_path):
    from cfmlang.ops.merge.chat_templates import LLAMA3
    from cfmlang.runtime.run import load_tokenizer

    out = tmp_path / "out"
    cfmlang.compile(fill('model c:\n  source: hf "{c}"\nmerge chat: {method: linear, inputs: [c], weight: 1, '
                         'chat_template: llama3}\noutput: chat\n', zoo), out)
    merged, original = tensors(out), tensors(zoo["c"])
    assert set(merged) == set(original) and all(torch.equal(merged[n], original[n]) for n in merged)
    tokenizer = load_tokenizer(out)
    assert tokenizer.chat_template == LLAMA3 and tokenizer.get_vocab() == _vocab(zoo["c"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": " the cat "}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == ("<s><|start_header_id|>user<|end_header_id|>\n\nthe cat<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
