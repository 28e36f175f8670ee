"""Running lowered programs: a static KV cache, greedy and sampled decoding, streaming.

`LoweredModel` is what `cfmlang.load` returns for an artifact compiled with
`--target export|inductor|tensorrt`. Its `generate` takes the arguments of HF
`generate` that matter here (input_ids, max_new_tokens, do_sample, temperature, top_k,
top_p, streamer, eos/pad ids) and returns prompt + new tokens like HF does; greedy
decoding gives HF's tokens for the same weights.

Each target's program is one `step(ids, positions, cache) -> (logits, cache)`:
the export and inductor programs update the cache in place (inductor packages written
before that return it), the tensorrt programs return it; tensorrt programs have static
shapes, so prompts and batches are padded. A decode step is one program call: the
token's position tensor is reused from step to step rather than rebuilt.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from cfmlang.artifact.programs import native_program, open_export_program, refused
from cfmlang.artifact.load import transformers_config
from cfmlang.artifact.read import lowered_entry
from cfmlang.compiler.lower.decoder import empty_cache
from cfmlang.diagnostics import CompileError, error
from cfmlang.runtime import native

DEFAULT_NEW_TOKENS = 20


def for_step(programs: dict, ids: torch.Tensor, decode_max_batch: int | None = None):
    """The program for a step over `ids` [batch, length]: `decode` for one token when
    there is one (routed or packed models; packed ones up to `decode_max_batch` rows),
    else `prefill`, else the single `program`."""
    batch, length = ids.shape
    if length == 1 and "decode" in programs and (decode_max_batch is None or batch <= decode_max_batch):
        return programs["decode"]
    return programs.get("prefill", programs.get("program"))


class InPlaceProgram:
    """`torch.export.load(...).module()`: mutates the caches it is given. The archives are
    inspected first and refused if they hold pickled payloads (`artifact.programs`)."""

    def __init__(self, paths: dict[str, Path], device: str):
        self.modules = {name: load_export(path).module().to(device) for name, path in paths.items()}

    def step(self, ids, positions, cache):
        return for_step(self.modules, ids)(ids, positions, *cache), cache


def load_export(path: Path) -> torch.export.ExportedProgram:
    """The checked export archive at `path`, loaded; E210 when torch cannot load it."""
    program = open_export_program(path)
    try:
        return torch.export.load(program)
    except Exception as exc:  # noqa: BLE001 - any failure to read an untrusted archive is the user's file
        raise refused(path, f"cannot be loaded ({type(exc).__name__}: {str(exc)[:200]})") from None


class InductorProgram:
    """AOTInductor packages: write the caches in place, or (`in_place=False`, packages
    written before that) return the updated ones. Their kernels assume the strides of
    contiguous inputs (a sliced prompt would be misread), hence `contiguous()`."""

    def __init__(self, paths: dict[str, Path], decode_max_batch: int | None = None, trust_code: bool = False,
                 in_place: bool = True, native_kernels: bool = False):
        if native_kernels:
            native.load()       # the exact packed decode program calls torch.ops.cfmlang.*
        self.runs = {name: PackageCall(load_native(path, trust_code,
                                                   lambda copy: torch._inductor.aoti_load_package(str(copy))))
                     for name, path in paths.items()}
        self.decode_max_batch, self.in_place = decode_max_batch, in_place

    def step(self, ids, positions, cache):
        run = for_step(self.runs, ids, self.decode_max_batch)
        keys, values = cache
        outputs = run([ids.contiguous(), positions.contiguous(), *keys, *values])
        if self.in_place:
            return outputs[0], cache
        layers = len(keys)
        return outputs[0], (outputs[1:1 + layers], outputs[1 + layers:])


class PackageCall:
    """A loaded AOTInductor package called with its flat list of input tensors, returning
    its flat list of outputs. The package's own `__call__` parses its input and output tree
    specs from JSON on every call (a tenth of a millisecond per decode step with SmolLM2's
    62 inputs); this calls the loader's runner directly when the package has one."""

    def __init__(self, package):
        self.package = package
        self.run = getattr(getattr(package, "loader", None), "boxed_run", None)

    def __call__(self, flat: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.run is not None:
            return self.run(flat)
        outputs = self.package(*flat[:2], flat[2:2 + (len(flat) - 2) // 2], flat[2 + (len(flat) - 2) // 2:])
        return [outputs] if isinstance(outputs, torch.Tensor) else [outputs[0], *outputs[1], *outputs[2]]


class StaticProgram:
    """Prefill and decode programs of fixed batch and prompt length (the TensorRT ones):
    prompts are right-padded to the prompt length and batches padded with rows of zeros."""

    def __init__(self, prefill, decode, static: dict):
        self.prefill, self.decode = prefill, decode
        self.batch, self.prompt_length = static["batch"], static["prompt_length"]

    @staticmethod
    def load(paths: dict[str, Path], static: dict, trust_code: bool = False) -> "StaticProgram":
        import torch_tensorrt

        return StaticProgram(*(load_native(paths[name], trust_code, lambda copy: torch_tensorrt.load(str(copy)).module())
                               for name in ("prefill", "decode")), static)

    def step(self, ids, positions, cache):
        batch, length = ids.shape
        padded = torch.zeros(self.batch, self.prompt_length if length > 1 else 1, dtype=ids.dtype, device=ids.device)
        padded[:batch, :length] = ids
        if length > 1:
            positions = torch.arange(self.prompt_length, device=ids.device)
        logits, keys, values = (self.prefill if length > 1 else self.decode)(padded, positions, *cache)
        return logits[:batch, :length], (keys, values)


def load_native(path: Path, trust_code: bool, loader):
    """`loader` applied to a private copy of the native program at `path`, if it is trusted."""
    with native_program(path, trust_code) as copy:
        return loader(copy)


class LoweredModel:
    """A lowered artifact with HF-like `generate` and `__call__` (logits of a prompt)."""

    def __init__(self, directory: Path, entry: dict, device: str | None = None, program=None,
                 trust_code: bool = False):
        """`entry` is the manifest's `lowered` entry; it is checked (`artifact.read`) unless
        `program` is given. `trust_code` loads native programs this machine did not build."""
        from transformers import GenerationConfig

        self.directory, self.entry = Path(directory), entry
        self.target = entry["target"]
        self.device = torch.device(device or entry.get("device", "cpu"))
        self.config = transformers_config(self.directory)
        self.generation_config = GenerationConfig.from_pretrained(directory) \
            if (self.directory / "generation_config.json").is_file() else GenerationConfig.from_model_config(self.config)
        self.dtype = getattr(torch, entry["dtype"])
        self.program = program if program is not None else self.load_program(trust_code)

    def load_program(self, trust_code: bool):
        checked = lowered_entry(self.directory, {"lowered": self.entry})
        if checked.target == "export":
            return InPlaceProgram(checked.files, str(self.device))
        if checked.target == "inductor":
            return InductorProgram(checked.files, checked.decode_max_batch, trust_code, checked.in_place_cache,
                                   native_kernels=checked.raw.get("packing", {}).get("kernel") == "exact")
        return StaticProgram.load(checked.files, checked.static, trust_code)

    def cache_for(self, batch: int, length: int):
        static = self.entry.get("static")
        if static:
            if batch > static["batch"] or length > static["cache_length"]:
                raise CompileError([error("E176", f"this tensorrt program was built for batch {static['batch']} "
                                          f"and {static['cache_length']} positions; asked for batch {batch}, "
                                          f"{length} positions", None,
                                          "recompile with larger --batch/--cache-length, or use fewer tokens")])
            batch, length = static["batch"], static["cache_length"]
        limit = self.entry.get("max_length") or self.config.max_position_embeddings
        if length > limit:
            raise CompileError([error("E176", f"{length} positions exceed the model's {limit}", None,
                                      "use a shorter prompt or fewer new tokens")])
        return empty_cache(self.config, batch, length, self.dtype, self.device)

    def prefill(self, input_ids, cache_length: int):
        cache = self.cache_for(input_ids.shape[0], cache_length)
        positions = torch.arange(input_ids.shape[1], device=self.device)
        return self.program.step(input_ids.to(self.device), positions, cache)

    def __call__(self, input_ids, **_unused):
        with torch.inference_mode():
            logits, _ = self.prefill(input_ids, input_ids.shape[1] + 1)
        return SimpleNamespace(logits=logits)

    def decode(self, token_ids, position: int, cache):
        positions = torch.tensor([position], device=self.device)
        return self.program.step(token_ids.to(self.device).unsqueeze(1), positions, cache)

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=None, do_sample=False,
                 temperature=None, top_k=None, top_p=None, streamer=None, eos_token_id=None,
                 pad_token_id=None, **_unused):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise CompileError([error("E176", "lowered programs generate for prompts of equal length "
                                      "(this attention_mask has padding)", None,
                                      "generate each prompt on its own, or use the eager artifact")])
        config = self.generation_config
        sampler = Sampler.build(do_sample, config, temperature, top_k, top_p)
        eos = eos_token_id if eos_token_id is not None else config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=self.device)
        pad = pad_token_id if pad_token_id is not None else (config.pad_token_id or 0)
        new = max_new_tokens or config.max_new_tokens or DEFAULT_NEW_TOKENS
        with torch.inference_mode():
            return self._generate(input_ids.to(self.device), new, sampler, eos, pad, streamer)

    def _generate(self, prompt, new_tokens: int, sampler, eos, pad: int, streamer):
        length = prompt.shape[1]
        logits, cache = self.prefill(prompt, length + new_tokens)
        tokens, finished = [prompt], torch.zeros(prompt.shape[0], dtype=torch.bool, device=self.device)
        if streamer is not None:
            streamer.put(prompt.cpu())
        for step in range(new_tokens):
            chosen = sampler(logits[:, -1, :]).masked_fill(finished, pad)
            tokens.append(chosen.unsqueeze(1))
            if streamer is not None:
                streamer.put(chosen.cpu())
            finished |= torch.isin(chosen, eos)
            if bool(finished.all()) or step == new_tokens - 1:
                break
            logits, cache = self.decode(chosen, length + step, cache)
        if streamer is not None:
            streamer.end()
        return torch.cat(tokens, dim=1)


class Sampler:
    """Greedy (argmax), or sampling with temperature, then top-k, then top-p (nucleus)."""

    def __init__(self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    @staticmethod
    def build(do_sample: bool, config, temperature, top_k, top_p):
        if not do_sample:
            return Sampler()
        pick = lambda given, default: default if given is None else given  # noqa: E731
        return Sampler(pick(temperature, config.temperature) or 1.0, pick(top_k, config.top_k),
                       pick(top_p, config.top_p))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature is None:
            return logits.argmax(dim=-1)
        return torch.multinomial(torch.softmax(self.filtered(logits), dim=-1), 1).squeeze(-1)

    def filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores with every token outside the top-k and the top-p nucleus at -inf."""
        scores = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ascending, order = scores.sort(dim=-1)
            tail = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            tail[..., -1] = False                        # the most likely token always stays
            scores = scores.scatter(-1, order, ascending.masked_fill(tail, float("-inf")))
        return scores

