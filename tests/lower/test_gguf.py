"""The gguf target on tiny random models with a byte-level BPE tokenizer: the file is read
back by transformers (weights dequantized, tokenizer rebuilt) and its logits match the
artifact's within the quantization's error; bad requests are diagnostics, nothing written."""
from __future__ import annotations

import json

import pytest
import torch
from models import tiny_model

from cfmlang.cli import main
from cfmlang.compiler.lower.gguf_file import interleave_rotary_halves

VOCAB = 300
MERGE = """model a:
  source: hf "a"
model b:
  source: hf "b"
merge mix:
  method: linear
  inputs:
    a: {weight: 0.4}
    b: {weight: 0.6}
output: mix
"""
TEXT = "the sea and the sky, a poem of love at night; add the sum in the loop"


def bpe_tokenizer(folder):
    """A byte-level BPE tokenizer of VOCAB entries trained here, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([TEXT] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    for name, seed in (("a", 3), ("b", 4)):
        tiny_model(folder / name, seed=seed, vocab_size=VOCAB, num_key_value_heads=2)
        bpe_tokenizer(folder / name)
    (folder / "mix.brick").write_text(MERGE)
    return folder


def compile_gguf(folder, out, *extra):
    return main(["compile", str(folder / "mix.brick"), "-o", str(out), "--target", "gguf", "-q", *extra])


def read_back(out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "lowered", gguf_file="model.gguf", dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(out / "lowered", gguf_file="model.gguf")


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits[0]


@pytest.mark.parametrize("quant, tolerance", [("f32", 1e-5), ("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 0.25)])
def test_gguf_reads_back_with_the_artifacts_logits(models, tmp_path, quant, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert compile_gguf(models, out, "--quant", quant) == 0
    lowered = json.loads((out / "cfm.json").read_text())["lowered"]
    assert lowered["target"] == "gguf" and lowered["quant"] == quant and lowered["files"]["model"] == "lowered/model.gguf"

    original = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    model, gguf_tokenizer = read_back(out)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    assert gguf_tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    want, got = logits(original, ids), logits(model, ids)
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert error < tolerance, f"{quant}: relative logit error {error}"
    if quant != "f32":
        assert error > 1e-7   # the weights really were stored at a lower precision


def test_gguf_carries_the_tokenizers_special_tokens_and_chat_template(models, tmp_path):
    import gguf

    out = tmp_path / "out"
    assert compile_gguf(models, out, "--quant", "q8_0") == 0
    reader = gguf.GGUFReader(out / "lowered" / "model.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith(("tokenizer", "llama"))}
    tokenizer = bpe_tokenizer(tmp_path / "tok")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][tokenizer.eos_token_id] == "<|im_end|>"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads((models / "a" / "tokenizer.json").read_text())["model"]["merges"])
    assert fields["llama.block_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_rotary_interleave_pairs_each_heads_halves():
    weight = torch.arange(8.0).repeat_interleave(3).reshape(8, 3)   # 2 heads of 4 rows
    rows = interleave_rotary_halves(weight, heads=2)[:, 0].tolist()
    assert rows == [0, 2, 1, 3, 4, 6, 5, 7]


def test_unwritable_quant_is_refused_before_any_weight_is_read(models, tmp_path, capsys):
    assert compile_gguf(models, tmp_path / "out", "--quant", "q4_k_m") == 1
    err = capsys.readouterr().err
    assert "E251" in err and "can read but not write" in err and "q8_0" in err
    assert not (tmp_path / "out").exists()
    assert compile_gguf(models, tmp_path / "out", "--quant", "q9") == 1
    assert "not a GGUF quantization type" in capsys.readouterr().err


def test_word_level_tokenizer_is_a_diagnostic(tiny_zoo, tmp_path, capsys):
    from models import tiny_tokenizer

    for name in ("a", "b"):
        tiny_tokenizer(tiny_model(tmp_path / name, seed=7))
    (tmp_path / "mix.brick").write_text(MERGE)
    assert compile_gguf(tmp_path, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "E253" in err and "WordLevel" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unsupported_family_is_a_diagnostic(tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    for name in ("a", "b"):
        Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=VOCAB)).save_pretrained(tmp_path / name)
        bpe_tokenizer(tmp_path / name)
    (tmp_path / "mix.brick").write_text(MERGE)
    assert compile_gguf(tmp_path, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "E250" in err and "qwen2" in err and "llama, mistral" in err
    assert not (tmp_path / "out").exists()


def test_load_refuses_the_gguf_target_and_gives_the_eager_model(models, tmp_path):
    import cfmlang
    from cfmlang.diagnostics import CompileError

    out = tmp_path / "out"
    assert compile_gguf(models, out, "--quant", "q8_0") == 0
    with pytest.raises(CompileError, match="E254"):
        cfmlang.load(out, target="gguf")
    assert type(cfmlang.load(out)).__name__ == "LlamaForCausalLM"
