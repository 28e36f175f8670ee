"""How a model family names and groups its tensors.

The one place of the compiler that knows that a Llama keeps its layers under
`model.layers.N` and its attention output projection at `self_attn.o_proj`, while a
GPT-2 says `transformer.h.N` and `attn.c_proj`. Everything else asks `describe(config)`.

A description is derived from transformers' own classes: the causal-LM class is built
from the config on the meta device (no weights), the layer container is the
`nn.ModuleList` as long as the layer count, and each tensor owner of layer 0 is given a
role ("attn.q", "ffn.down", "norm.attn", ...) by its place (attention or FFN child of the
layer) and small tables of known member names.

Two layouts: "checkpoint" (default) names tensors as the files on disk do (what
`save_pretrained` writes: Mixtral's `block_sparse_moe.experts.N.w1`, Gemma 3's
`language_model.model.layers`); "module" names them as the transformers module in memory
does (recent transformers fuse MoE experts into 3-D `mlp.experts.gate_up_proj`).
Only modules that hold tensors are members: OLMo's parameter-free layer norms are not.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Iterable

from cfmlang.cachedir import default_cache_dir
from cfmlang.diagnostics import Diagnostic, Span, did_you_mean, error

SUPPORTED = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
             "gemma3", "gemma3_text", "phi", "phi3", "stablelm", "starcoder2", "gpt2", "gpt_bigcode", "gpt_neox",
             "falcon", "cohere", "olmo", "olmo2", "granite")
LAYOUTS = ("checkpoint", "module")

ROLES = {
    "attn.q": "a separate query projection", "attn.k": "a separate key projection",
    "attn.v": "a separate value projection", "attn.qkv": "a fused query/key/value projection",
    "attn.o": "an attention output projection", "attn.q_norm": "a query norm", "attn.k_norm": "a key norm",
    "ffn.gate": "a separate FFN gate projection", "ffn.up": "an FFN up projection",
    "ffn.down": "an FFN down projection", "ffn.gate_up": "a fused FFN gate/up projection",
    "ffn.router": "an MoE router", "ffn.experts": "MoE experts", "ffn.shared_expert": "a shared MoE expert",
    "norm.attn": "a norm before attention", "norm.attn_out": "a norm on the attention output",
    "norm.ffn": "a norm before the FFN", "norm.ffn_out": "a norm on the FFN output",
    "embed": "token embeddings", "position_embed": "learned position embeddings",
    "final_norm": "a final norm", "lm_head": "an output head",
}
_ATTN_LEAVES = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o", "dense": "attn.o",
                "c_proj": "attn.o", "out_proj": "attn.o", "query_key_value": "attn.qkv", "c_attn": "attn.qkv",
                "qkv_proj": "attn.qkv", "q_norm": "attn.q_norm", "k_norm": "attn.k_norm",
                "q_layernorm": "attn.q_norm", "k_layernorm": "attn.k_norm"}
_FFN_LEAVES = {"gate_proj": "ffn.gate", "up_proj": "ffn.up", "fc1": "ffn.up", "c_fc": "ffn.up",
               "dense_h_to_4h": "ffn.up", "fc_in": "ffn.up", "down_proj": "ffn.down", "fc2": "ffn.down",
               "c_proj": "ffn.down", "dense_4h_to_h": "ffn.down", "fc_out": "ffn.down", "gate_up_proj": "ffn.gate_up",
               "gate": "ffn.router", "router": "ffn.router", "experts": "ffn.experts",
               "shared_expert": "ffn.shared_expert", "shared_experts": "ffn.shared_expert"}
# direct norm children of a layer; post_attention_layernorm is the pre-FFN norm unless overridden
_NORMS = {"input_layernorm": "norm.attn", "ln_1": "norm.attn", "ln_attn": "norm.attn",
          "post_attention_layernorm": "norm.ffn", "ln_2": "norm.ffn", "ln_mlp": "norm.ffn",
          "pre_feedforward_layernorm": "norm.ffn", "post_feedforward_layernorm": "norm.ffn_out"}
_ATTN_OUT = {"post_attention_layernorm": "norm.attn_out"}   # these families norm the attention output
_NORM_OVERRIDES = {"gemma2": _ATTN_OUT, "gemma3_text": _ATTN_OUT, "olmo2": _ATTN_OUT}
_GROUPS = {"self_attn": "attn", "attn": "attn", "attention": "attn", "self_attention": "attn",
           "mlp": "ffn", "block_sparse_moe": "ffn", "feed_forward": "ffn"}   # checkpoint-side child names
_EXPERT_DOWN = ("w2", "down_proj", "c_proj", "fc2")
"""Names of an expert's output projection (Mixtral's w2, Qwen-MoE's down_proj ...)."""
_FFN_CLASS_WORDS = ("MLP", "Moe", "MoE", "FeedForward", "Experts")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_GGUF_TOP = {"token_embd": "embed", "position_embd": "position_embed", "output_norm": "final_norm",
             "output": "lm_head"}
_GGUF_BLOCK = {"attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_qkv": "attn.qkv",
               "attn_output": "attn.o", "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm",
               "ffn_gate": "ffn.gate", "ffn_up": "ffn.up", "ffn_down": "ffn.down", "ffn_gate_inp": "ffn.router",
               "attn_norm": "norm.attn", "ffn_norm": "norm.ffn", "post_attention_norm": "norm.attn_out",
               "post_ffw_norm": "norm.ffn_out"}


class ArchitectureError(Exception):
    """An architecture the module cannot describe, or a role an operation needs that it lacks."""

    code = "E056"

    def __init__(self, message: str, help: str = ""):
        super().__init__(message)
        self.message, self.help = message, help

    def diagnostic(self, span: Span | None = None) -> Diagnostic:
        return error(self.code, self.message, span, self.help)


@dataclass(frozen=True)
class ConfigKeys:
    """Which config.json keys hold the sizes; `section` names the nested dict that holds
    them ("text_config" for multimodal configs), None for the top level."""
    num_layers: str
    hidden_size: str
    intermediate_size: str | None
    vocab_size: str
    section: str | None = None


@dataclass(frozen=True)
class Architecture:
    """The tensor naming of one model family (one config), in one layout."""
    model_type: str
    layers: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    keys: ConfigKeys
    members: tuple[tuple[str, str], ...]
    embed: str
    final_norm: str | None
    lm_head: str
    tied: bool
    position_embed: str | None = None
    unclassified: tuple[str, ...] = ()   # tensor-holding members of a layer with no role
    parallel: bool = False               # attention and FFN read the same input (phi, falcon, neox ...)
    layout: str = "checkpoint"
    transposed: bool = False             # projections stored [in, out] (GPT-2's Conv1D), not [out, in]
    causal_lm: str = ""                  # the transformers class, e.g. LlamaForCausalLM

    def member(self, role: str) -> str | None:
        """The member path (inside a layer) of a role, or None."""
        return next((path for r, path in self.members if r == role), None)

    def top(self, role: str) -> str | None:
        """The module path of a non-layer role: embed, position_embed, final_norm, lm_head."""
        return {"embed": self.embed, "position_embed": self.position_embed,
                "final_norm": self.final_norm, "lm_head": self.lm_head}.get(role)

    def module(self, layer: int, role: str) -> str:
        """The full module path of a layer role, e.g. `model.layers.3.self_attn.o_proj`."""
        path = self.member(role)
        if path is None:
            raise self._lacking(role, f"there is no {role} in layer {layer}")
        return f"{self.layer_prefix(layer)}{path}"

    def layer_prefix(self, layer: int) -> str:
        """`model.layers.3.`: the start of every tensor name of a layer."""
        return f"{self.layers}.{layer}."

    def _layer_match(self, tensor: str) -> re.Match | None:
        return _layer_pattern(self.layers).match(tensor)

    def layer_of(self, tensor: str) -> int | None:
        """The layer index of a tensor name, None for tensors outside the layers."""
        match = self._layer_match(tensor)
        return int(match.group(1)) if match else None

    def renumbered(self, tensor: str, layer: int) -> str:
        """The same tensor in another layer."""
        match = self._layer_match(tensor)
        if match is None:
            raise ValueError(f"`{tensor}` is not a tensor of a {self.model_type} layer")
        return self.layer_prefix(layer) + match.group(2)

    def role_of(self, tensor: str) -> str | None:
        """The role of a tensor name ("attn.o", "embed", ...), None if unclassified."""
        match = self._layer_match(tensor)
        if match:
            inner = match.group(2)
            found = [(len(path), role) for role, path in self.members if inner.startswith(path + ".")]
            return max(found)[1] if found else None
        return next((role for role in ("embed", "position_embed", "final_norm", "lm_head")
                     if self.top(role) and tensor.startswith(self.top(role) + ".")), None)

    def require(self, roles: Iterable[str], purpose: str) -> None:
        """Raise ArchitectureError for the first role these models lack."""
        for role in roles:
            if self.member(role) is None and self.top(role) is None:
                raise self._lacking(role, f"`{purpose}` needs {role}")

    def _lacking(self, role: str, lead: str) -> ArchitectureError:
        if role not in ROLES:
            raise ValueError(f"unknown role `{role}` (roles: {', '.join(ROLES)})")
        return ArchitectureError(self.lacking(f"{lead} ({ROLES[role]})"),
                                 f"a {self.model_type} layer's tensors live under "
                                 f"{', '.join(p for _, p in self.members)}")

    def lacking(self, needed: str) -> str:
        """`needed`, which this family lacks, with the roles its layers do hold."""
        held = ", ".join(r for r, _ in self.members) or "no tensors"
        return f"{needed}, which {self.model_type} models do not have (their layers hold: {held})"

    def writes_residual(self, tensor: str) -> bool:
        """Whether a layer tensor belongs to a projection that writes into the residual
        stream (attention output, FFN or expert down projection): with these zeroed, a
        block adds nothing (LLaMA Pro's identity blocks)."""
        role = self.role_of(tensor)
        if role in ("attn.o", "ffn.down"):
            return True
        if role in ("ffn.experts", "ffn.shared_expert"):
            leaf = tensor.rsplit(".", 2)[-2] if tensor.count(".") >= 2 else ""
            return leaf in _EXPERT_DOWN
        return False

    def residual_roles(self) -> tuple[str, ...]:
        """The roles whose tensors write into the residual stream in this family's layers."""
        ffn = "ffn.experts" if self.member("ffn.experts") else "ffn.down"
        return ("attn.o", ffn)

    def leaves(self, roles: Iterable[str]) -> list[str]:
        """The module names (last path part, as PEFT's `target_modules` take them) of
        those of `roles` this family has, in order: ["q_proj", "v_proj"] for a Llama's
        ("attn.q", "attn.v")."""
        found = [self.member(role) for role in roles]
        return list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in found if path))

    @property
    def gated_ffn(self) -> bool:
        """Separate gate, up and down linears (Llama-style SwiGLU)."""
        return all(self.member(r) for r in ("ffn.gate", "ffn.up", "ffn.down"))


def describe(config: dict, *, layout: str = "checkpoint") -> Architecture:
    """The architecture of a config.json dict (multimodal configs: their text decoder)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ArchitectureError("config.json has no `model_type`", "a transformers config names its model_type")
    return _described(json.dumps(config, sort_keys=True, default=str), layout)


@functools.lru_cache(maxsize=64)
def _layer_pattern(layers: str) -> re.Pattern:
    """`model.layers.N.rest` for the layer list at `layers` (compiled once: the checker
    asks it of every tensor of every model)."""
    return re.compile(rf"{re.escape(layers)}\.(\d+)\.(.+)$")


@functools.lru_cache(maxsize=64)
def _described(config_json: str, layout: str) -> Architecture:
    """The description from the store on disk when it holds this config, else built from
    transformers' classes (importing them costs seconds per process) and stored."""
    path = _stored_path(config_json, layout)
    found = _read_stored(path)
    if found is not None:
        return found
    arch = _describe(config_json, layout)
    _store(path, arch)
    return arch


def _stored_path(config_json: str, layout: str) -> Path:
    """The store entry of a config: keyed by the config, the layout, the installed
    transformers and this module's own source, so a new version of either rebuilds it."""
    from importlib.metadata import version

    key = hashlib.sha256("\0".join((config_json, layout, version("transformers"), _source_hash())).encode())
    return default_cache_dir() / "architectures" / f"{key.hexdigest()}.json"


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _read_stored(path: Path) -> Architecture | None:
    try:
        data = json.loads(path.read_text())
        return Architecture(**{**data, "keys": ConfigKeys(**data["keys"]),
                               "members": tuple(tuple(m) for m in data["members"]),
                               "unclassified": tuple(data["unclassified"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None   # absent or damaged: described again


def _store(path: Path, arch: Architecture) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(dataclasses.asdict(arch)))
        os.replace(tmp, path)
    except OSError:
        pass   # a read-only cache only costs the next process the description


def upcycled(base: Architecture, experts: int) -> Architecture:
    """The Mixtral description of `base` with every FFN made `experts` experts (what grow's
    upcycle and moe write): the same layers, attention and norms, Mixtral's router and
    experts in place of the FFN."""
    mixtral = _mixtral_members()
    members = tuple((role, path) for role, path in base.members if not role.startswith("ffn.")) + mixtral
    return dataclasses.replace(base, model_type="mixtral", members=members, unclassified=())


@functools.lru_cache(maxsize=1)
def _mixtral_members() -> tuple[tuple[str, str], ...]:
    tiny = {"model_type": "mixtral", "num_hidden_layers": 1, "hidden_size": 8, "intermediate_size": 8,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 8, "num_local_experts": 2}
    return tuple((role, path) for role, path in describe(tiny).members if role.startswith("ffn."))


def of_model(model) -> Architecture:
    """The layout of a loaded transformers model, named as its modules are in memory."""
    return describe(model.config.to_dict(), layout="module")


def checkpoint_tensors(model, tensors: dict) -> dict:
    """Tensors of a loaded model, named as the module names them, renamed (and split)
    as `save_pretrained` would write them: Mixtral's fused experts become per-expert
    `w1`/`w2`/`w3`."""
    return _revert(model, tensors)


def head_logits(model, hidden):
    """The logits a loaded causal LM computes from final hidden states: its output head,
    then the family's own scaling of the result (Cohere's `logit_scale`, Granite's
    `logits_scaling`, Gemma 2/3's final soft-capping), as its forward does."""
    config = model.config.get_text_config()
    logits = model.get_output_embeddings()(hidden)
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None) is not None:
        cap = config.final_logit_softcapping
        logits = (logits / cap).tanh() * cap
    return logits


def layer_module(model, layer: int, role: str | None = None):
    """The torch module of layer `layer` of a loaded model, or of one of its roles
    (`ffn.down` ...); ArchitectureError when the family has no such role."""
    layout = of_model(model)
    return model.get_submodule(layout.module(layer, role) if role else f"{layout.layers}.{layer}")


def num_layers_key(config: dict) -> str:
    """Which key of the config (of its text_config, for multimodal ones) holds the layer count."""
    section = _section(config)
    for key in _layer_key_candidates(config):
        if key in section:
            return key
    raise ArchitectureError(
        f"the config of a {config.get('model_type')} model has no layer count "
        f"(looked for {', '.join(f'`{k}`' for k in _layer_key_candidates(config))})",
        "config.json must state how many layers the model has")


def gguf_tensor_name(arch: Architecture, gguf_name: str) -> str | None:
    """The tensor name in `arch` of a llama.cpp GGUF tensor name (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight` for Llama), None when it has none. Names only:
    llama.cpp stores Llama's q/k weights permuted for its rotary layout."""
    top = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if top and top.group(1) in _GGUF_TOP:
        path = arch.top(_GGUF_TOP[top.group(1)])
        return f"{path}.{top.group(2)}" if path else None
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not block or block.group(2) not in _GGUF_BLOCK or arch.member(_GGUF_BLOCK[block.group(2)]) is None:
        return None
    return f"{arch.module(int(block.group(1)), _GGUF_BLOCK[block.group(2)])}.{block.group(3)}"


# ---- building a description -------------------------------------------------------------

def _section(config: dict) -> dict:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _config_class(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if model_type not in CONFIG_MAPPING:
        hint = " ".join(filter(None, (did_you_mean(model_type, SUPPORTED), f"supported: {', '.join(SUPPORTED)}")))
        raise ArchitectureError(f"unknown model_type `{model_type}`: transformers has no such model family", hint)
    return CONFIG_MAPPING[model_type]


def _layer_key_candidates(config: dict) -> tuple[str, ...]:
    section = _section(config)
    model_type = section.get("model_type") or config.get("model_type", "")
    try:
        mapped = _config_class(model_type).attribute_map.get("num_hidden_layers")
    except ArchitectureError:
        mapped = None
    return tuple(dict.fromkeys(k for k in (mapped, *_LAYER_KEYS) if k))


def _describe(config_json: str, layout: str) -> Architecture:
    raw = json.loads(config_json)
    _config_class(raw["model_type"])         # unknown families first
    layer_key = num_layers_key(raw)          # a layer count must be stated, not defaulted
    model = _meta_model(raw)
    cfg = model.config.get_text_config()
    embed, head = _path_of(model, model.get_input_embeddings()), _path_of(model, model.get_output_embeddings())
    layers = _layer_container(model, embed, int(cfg.num_hidden_layers), raw["model_type"])
    saved = _saved_namer(model, layout)
    prefix = _saved_prefix(model, layers, saved)
    tensors = _layer_tensors(model, layers, layout)
    inner = {name[len(prefix) + 3:]: tuple(t.shape) for name, t in tensors.items() if name.startswith(prefix + ".0.")}
    members, unclassified = _classify(inner, _groups(model.get_submodule(layers)[0]), cfg.model_type)
    parent = layers.rpartition(".")[0]
    return Architecture(
        model_type=raw["model_type"], layers=prefix, num_layers=len(model.get_submodule(layers)),
        hidden_size=int(cfg.hidden_size), intermediate_size=_ffn_width(members, inner, cfg.hidden_size),
        vocab_size=int(cfg.vocab_size), keys=_config_keys(raw, layer_key, members, cfg),
        members=members, embed=_module_of(saved, embed), final_norm=_module_of(saved, _final_norm(model, parent)),
        lm_head=_module_of(saved, head),
        tied=model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        position_embed=_module_of(saved, _position_embed(model, parent, embed)),
        unclassified=unclassified, parallel=_parallel(cfg), layout=layout,
        transposed=any(type(m).__name__ == "Conv1D" for m in model.get_submodule(layers)[0].modules()),
        causal_lm=type(model).__name__)


def _meta_model(raw: dict):
    """The causal-LM module of a config, built on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    config_class = _config_class(raw["model_type"])
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config_class.from_dict(raw))
    except Exception as exc:  # noqa: BLE001 - any failure of transformers is a config it cannot build
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ArchitectureError(f"transformers cannot build a `{raw['model_type']}` causal language model from "
                                f"this config: {first}", f"supported families: {', '.join(SUPPORTED)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _path_of(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _layer_container(model, embed: str, count: int, model_type: str) -> str:
    """The ModuleList as long as the layer count, preferring a sibling of the embeddings."""
    import torch.nn as nn
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not lists:
        raise ArchitectureError(f"found no list of {count} layers in a {model_type} model",
                                "the layer count of config.json does not match the model's layer list")
    siblings = [name for name in lists if name.rpartition(".")[0] == embed.rpartition(".")[0]]
    return (siblings or lists)[0]


def _revert(model, state: dict) -> dict:
    """In-memory tensor names -> the names save_pretrained writes (renamed, split experts)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:          # a transformers without conversions: modules and files agree
        return state
    return revert_weight_conversion(model, state)


def _layer_tensors(model, layers: str, layout: str) -> dict:
    state = {k: v for k, v in model.state_dict().items() if k.startswith(layers + ".0.")}
    return state if layout == "module" else _revert(model, state)


def _saved_namer(model, layout: str):
    """In-memory name -> on-disk name, for one tensor that is renamed (not converted)."""
    state = model.state_dict()

    def saved(name: str) -> str:
        if layout == "module" or name not in state:
            return name
        renamed = list(_revert(model, {name: state[name]}))
        return renamed[0] if len(renamed) == 1 else name
    return saved


def _saved_prefix(model, layers: str, saved) -> str:
    """The layer container's on-disk prefix, through a layer-0 tensor whose own name is kept."""
    for name in model.state_dict():
        tail = name[len(layers):]
        if name.startswith(layers + ".0.") and saved(name).endswith(tail):
            return saved(name)[:-len(tail)]
    return layers


def _module_of(saved, module: str | None) -> str | None:
    """The on-disk path of a module, through the name of its weight."""
    if module is None:
        return None
    return saved(module + ".weight").rpartition(".")[0]


def _groups(layer) -> dict[str, str]:
    """Child name -> "attn" / "ffn", by the child's class, then by known checkpoint names."""
    groups = {}
    for name, child in layer.named_children():
        kind = type(child).__name__
        if "Attention" in kind:
            groups[name] = "attn"
        elif any(word in kind for word in _FFN_CLASS_WORDS):
            groups[name] = "ffn"
    return {**_GROUPS, **groups}


def _classify(inner: dict, groups: dict, model_type: str) -> tuple[tuple, tuple]:
    """(role, member) pairs and unclassified members of the tensors of one layer."""
    norms = {**_NORMS, **_NORM_OVERRIDES.get(model_type, {})}
    members, unclassified = {}, {}
    for name in inner:
        parts = name.split(".")
        if parts[0] in groups and len(parts) >= 3:
            path, table = ".".join(parts[:2]), _ATTN_LEAVES if groups[parts[0]] == "attn" else _FFN_LEAVES
            role = table.get(parts[1])
        else:
            path = ".".join(parts[:-1]) or name
            role = norms.get(path)
        if role and role not in members:
            members[role] = path
        elif members.get(role) != path:
            unclassified[path] = None
    order = list(ROLES)
    return tuple(sorted(members.items(), key=lambda item: order.index(item[0]))), tuple(unclassified)


def _ffn_width(members: tuple, inner: dict, hidden: int) -> int:
    """The FFN width, read off the shape of the down projection (or of an expert's)."""
    paths = tuple(p + "." for r, p in members if r in ("ffn.down", "ffn.experts"))
    for name, shape in inner.items():
        if name.startswith(paths) and len(shape) >= 2 and re.search(r"down|w2|c_proj|fc2|4h_to_h", name):
            dims = [d for d in shape[-2:] if d != hidden]
            return int(dims[-1]) if dims else hidden
    return 0


def _final_norm(model, parent: str) -> str | None:
    """The last norm module holding tensors beside the layer list."""
    base = model.get_submodule(parent) if parent else model
    norms = [name for name, m in base.named_children()
             if "Norm" in type(m).__name__ and any(True for _ in m.parameters())]
    return f"{parent}.{norms[-1]}".lstrip(".") if norms else None


def _position_embed(model, parent: str, embed: str) -> str | None:
    import torch.nn as nn
    base = model.get_submodule(parent) if parent else model
    found = [f"{parent}.{name}".lstrip(".") for name, m in base.named_children() if isinstance(m, nn.Embedding)]
    return next((name for name in found if name != embed), None)


def _config_keys(raw: dict, layer_key: str, members: tuple, cfg) -> ConfigKeys:
    section = "text_config" if isinstance(raw.get("text_config"), dict) else None
    full = cfg.to_dict()
    mapped = getattr(type(cfg), "attribute_map", {})
    moe = ("moe_intermediate_size",) if any(r == "ffn.experts" for r, _ in members) else ()
    width = next((k for k in (*moe, "intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim") if k in full), None)
    return ConfigKeys(num_layers=layer_key, hidden_size=mapped.get("hidden_size", "hidden_size"),
                      intermediate_size=width, vocab_size=mapped.get("vocab_size", "vocab_size"), section=section)


def _parallel(cfg) -> bool:
    """Attention and FFN read the same input and their outputs are summed."""
    if cfg.model_type in ("phi", "cohere"):
        return True
    return bool(getattr(cfg, "parallel_attn", False) or getattr(cfg, "use_parallel_residual", False))
