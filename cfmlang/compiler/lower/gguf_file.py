"""The `gguf` target: the artifact's model as one GGUF file for llama.cpp and Ollama.

`lowered/model.gguf` holds the weights (quantized to `--quant`), the hyperparameters
llama.cpp reads for the family, and the tokenizer (tokens, types, merges, special token
ids, chat template). Tensor names come from the `gguf` package's `TensorNameMap` (the
names llama.cpp's own converter writes), and the tensors whose layout llama.cpp changes
are found by their role in `cfmlang.architectures`' description of the model: the
query and key projections of the Llama family are stored with each head's rotary halves
interleaved, the layout llama.cpp's rotary embedding reads.

Quantization is the `gguf` package's: the types it can quantize in Python (`QUANTS`).
Matrices are quantized; vectors (norms, biases) stay float32, and a matrix whose rows do
not split into whole blocks is stored float16, as llama.cpp's converter does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import quants

from cfmlang.architectures import Architecture, describe
from cfmlang.diagnostics import CompileError, error

GGUF_NAME = "model.gguf"
QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""What `--quant` accepts: the types the installed `gguf` package quantizes in Python
(its k-quants, such as q4_k_m, it can only read)."""
FAMILIES = {"llama": "llama", "mistral": "llama"}
"""model_type -> the llama.cpp architecture whose hyperparameters this module writes."""
ROTARY_INTERLEAVED = ("attn.q", "attn.k")
UNUSED_TOKEN = "[PAD{}]"


@dataclass(frozen=True)
class Vocabulary:
    """A byte-level BPE tokenizer as GGUF stores it."""

    tokens: tuple[str, ...]
    types: tuple[gguf.TokenType, ...]
    merges: tuple[str, ...]
    special_ids: dict
    add_bos: bool
    chat_template: str | None
    pre_tokenizer: str | None


def require_quant(quant: str) -> None:
    """Refuse an unknown or unsupported `--quant` before any weight is read."""
    if quant in QUANTS:
        return
    readable = f"MOSTLY_{quant.upper().replace('-', '_')}" in gguf.LlamaFileType.__members__
    reason = "the installed gguf package can read but not write this type" if readable \
        else "not a GGUF quantization type"
    raise CompileError([error("E251", f"`--quant {quant}`: {reason}", None,
                              f"quantizations written: {', '.join(QUANTS)}; for a k-quant, run llama.cpp's "
                              f"`llama-quantize` on the f16 or q8_0 file")])


def lower(directory: Path, manifest: dict, options, log) -> dict:
    config = _standard_config(directory, manifest)
    arch = describe(config)
    family = _family(arch)
    vocabulary = read_vocabulary(directory, config)
    path = directory / "lowered" / GGUF_NAME
    log(f"writing {path.name} ({options.quant})")
    counts = write_gguf(path, directory, config, arch, family, vocabulary, options.quant, manifest["output"])
    return {"files": {"model": f"lowered/{GGUF_NAME}"}, "quant": options.quant, "gguf_arch": family,
            "pre_tokenizer": vocabulary.pre_tokenizer or "default", "tensor_types": counts}


def _standard_config(directory: Path, manifest: dict) -> dict:
    if not manifest.get("standard") or "kind" in manifest or not (directory / "config.json").is_file():
        what = manifest.get("kind", "an adapter" if (directory / "adapter_config.json").is_file() else "this output")
        raise CompileError([error("E250", f"`--target gguf` writes standard models only, not {what}", None,
                                  "compile a model node (a merge, grow, update or attach) as the output")])
    return json.loads((directory / "config.json").read_text())


def _family(arch: Architecture) -> str:
    if arch.model_type not in FAMILIES:
        raise CompileError([error("E250", f"`--target gguf` does not write {arch.model_type} models", None,
                                  f"families written: {', '.join(FAMILIES)}; compile with another --target")])
    return FAMILIES[arch.model_type]


def write_gguf(path: Path, directory: Path, config: dict, arch: Architecture, family: str,
               vocabulary: Vocabulary, quant: str, title: str) -> dict[str, int]:
    """Write the GGUF file (`title`: its general.name); the count of tensors stored per type."""
    writer = gguf.GGUFWriter(path, family)
    writer.add_name(title)
    _write_hyperparameters(writer, config, arch, quant)
    _write_vocabulary(writer, vocabulary)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.upper()], arch.num_layers)
    counts: dict[str, int] = {}
    for name, tensor in _artifact_tensors(directory):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CompileError([error("E252", f"tensor `{name}` has no name in llama.cpp's {family} layout", None,
                                      "the output adds tensors a standard model does not have; "
                                      "compile it with another --target")])
        if arch.role_of(name) in ROTARY_INTERLEAVED and tensor.dim() == 2:
            tensor = interleave_rotary_halves(tensor, _heads(config, arch.role_of(name)))
        data, kind = encode(tensor, quant)
        writer.add_tensor(gguf_name, data, raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(sorted(counts.items()))


def _heads(config: dict, role: str) -> int:
    """The number of heads a query (`attn.q`) or key (`attn.k`) projection holds."""
    heads = config["num_attention_heads"]
    return heads if role == "attn.q" else config.get("num_key_value_heads") or heads


def _artifact_tensors(directory: Path):
    from safetensors import safe_open

    from cfmlang.io.sources import weight_files

    for file in weight_files(directory, False):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def interleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from (first half, second half) to pairs (i, i + d/2):
    transformers' rotary rotates halves, llama.cpp's rotates adjacent pairs."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def encode(tensor: torch.Tensor, quant: str):
    """(bytes or array, GGML type) of one tensor quantized to `quant`."""
    values = tensor.to(torch.float32).numpy()
    if tensor.dim() < 2 or quant == "f32":
        return values, gguf.GGMLQuantizationType.F32
    kind = gguf.GGMLQuantizationType[quant.upper()]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if values.shape[-1] % block:
        kind = gguf.GGMLQuantizationType.F16
    if kind == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16), kind
    return quants.quantize(values, kind), kind


def _write_hyperparameters(writer, config: dict, arch: Architecture, quant: str) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or arch.hidden_size // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.num_layers)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(arch.vocab_size)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(config: dict) -> float:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise CompileError([error("E250", f"`--target gguf` does not write `{kind}` rotary scaling", None,
                                  "compile with another --target")])
    return scaling.get("rope_theta") or config.get("rope_theta") or 10000.0


def _file_type(quant: str):
    return {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16}.get(
        quant, getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}", None))


def read_vocabulary(directory: Path, config: dict) -> Vocabulary:
    """The artifact's tokenizer as GGUF stores it; byte-level BPE tokenizers only."""
    from transformers import AutoTokenizer

    if not (directory / "tokenizer.json").is_file():
        raise CompileError([error("E253", "`--target gguf` needs the model's tokenizer (tokenizer.json), "
                                  "and the output has none", None,
                                  "give the base model a tokenizer.json; llama.cpp cannot load a GGUF without one")])
    spec = json.loads((directory / "tokenizer.json").read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(spec):
        raise CompileError([error("E253", f"`--target gguf` writes byte-level BPE tokenizers; this one is "
                                  f"{model.get('type', 'unknown')}" + ("" if model.get("type") != "BPE" else
                                                                       " without a byte-level pre-tokenizer"),
                                  None, "the GPT-2 style tokenizers of SmolLM2, Llama 3, Qwen 2 ... are written")])
    tokenizer = AutoTokenizer.from_pretrained(directory)
    size = config["vocab_size"]
    tokens = [UNUSED_TOKEN.format(i) for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in model["vocab"].items():
        if index < size:
            tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        if index < size:
            tokens[index], types[index] = added.content, \
                gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model.get("merges", []))
    special = {role: getattr(tokenizer, f"{role}_token_id") for role in ("bos", "eos", "unk", "pad")}
    probe = tokenizer("a")["input_ids"]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return Vocabulary(tuple(tokens), tuple(types), merges, {k: v for k, v in special.items() if v is not None},
                      bool(probe) and probe[0] == special["bos"], template, _pre_tokenizer(spec))


def _byte_level(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(part.get("type") == "ByteLevel" for part in parts)


def _pre_tokenizer(spec: dict) -> str | None:
    """llama.cpp's name of the tokenizer's split: `gpt-2` for a lone ByteLevel pre-tokenizer
    with its regex (GPT-2's split, which SmolLM2's converted tokenizer uses; llama.cpp
    refuses to load a file naming an unknown split, such as `gpt2`); None (llama.cpp's
    default) for others."""
    pre = spec.get("pre_tokenizer") or {}
    return "gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) else None


def _write_vocabulary(writer, vocabulary: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    if vocabulary.pre_tokenizer:
        writer.add_tokenizer_pre(vocabulary.pre_tokenizer)
    writer.add_token_list(list(vocabulary.tokens))
    writer.add_token_types(list(vocabulary.types))
    writer.add_token_merges(list(vocabulary.merges))
    for role, index in vocabulary.special_ids.items():
        getattr(writer, f"add_{role}_token_id")(index)
    writer.add_add_bos_token(vocabulary.add_bos)
    if vocabulary.chat_template:
        writer.add_chat_template(vocabulary.chat_template)
