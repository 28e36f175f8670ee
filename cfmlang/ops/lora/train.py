"""Training a LoRA brick: read the data file, inject PEFT LoRA layers into the base, and
fine-tune them with AdamW on CPU, deterministically under the seed.

Data files: `.txt` (each non-blank line is one training text) or `.jsonl` (each line an
object with `text`, or with `prompt` and `response`: the prompt is wrapped in the
tokenizer's chat template when it has one, and only the response is learned).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cfmlang.io.datafile import read_data_text

from cfmlang.ops.lora.factors import LoraAdapter, adapter_from_peft, peft_config

IGNORE = -100
OnStep = Callable[[int, int, float], None]
"""Called after each step with (step, steps, loss)."""


@dataclass(frozen=True)
class Sample:
    text: str                 # what is learned
    prompt: str | None        # what it answers (not learned), or None for plain text


class DataError(Exception):
    """A problem with a data file, at a line of it (0 for the whole file)."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(message)
        self.line = line


def read_samples(path: Path) -> list[Sample]:
    try:
        lines = read_data_text(path).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read `{path.name}`: {exc}") from None
    if path.suffix not in (".txt", ".jsonl"):
        raise DataError(f"`{path.name}` is neither a .txt nor a .jsonl file")
    samples = [_sample(line, number, path.suffix) for number, line in enumerate(lines, start=1)
               if line.strip()]
    if not samples:
        raise DataError(f"`{path.name}` holds no samples")
    return samples


def _sample(line: str, number: int, suffix: str) -> Sample:
    if suffix == ".txt":
        return Sample(line.strip(), None)
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise DataError(f"not a JSON object: {exc}", number) from None
    except RecursionError:
        raise DataError("not a JSON object: nested too deep", number) from None
    if not isinstance(record, dict):
        raise DataError("each line must be a JSON object", number)
    if isinstance(record.get("text"), str) and record["text"]:
        return Sample(record["text"], None)
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str) and record["response"]:
        return Sample(record["response"], record["prompt"])
    raise DataError('expected `{"text": "..."}` or `{"prompt": "...", "response": "..."}`', number)


def encode(tokenizer, sample: Sample, max_length: int, system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt tokens masked out), cut to max_length; `system` is the
    system message of chat-formatted prompts (None: the template's default)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if sample.prompt is None:
        ids = tokenizer(sample.text)["input_ids"] + eos
        labels = list(ids)
    else:
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": sample.prompt}]
            if system is not None:
                messages.insert(0, {"role": "system", "content": system})
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tokenizer(sample.prompt)["input_ids"]
        answer = tokenizer(sample.text, add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer
    return ids[:max_length], labels[:max_length]


def batch(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id)
    labels = torch.full((len(encoded), width), IGNORE)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (sample_ids, sample_labels) in enumerate(encoded):
        ids[row, : len(sample_ids)] = torch.tensor(sample_ids)
        labels[row, : len(sample_labels)] = torch.tensor(sample_labels)
        mask[row, : len(sample_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def sample_order(count: int, batch_size: int, steps: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of sample indices: successive shuffles of the data, cut into batches."""
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(count, generator=generator).tolist()
    return [stream[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def train(model, tokenizer, samples: list[Sample], options: dict,
          on_step: OnStep = lambda step, steps, loss: None) -> tuple[LoraAdapter, list[float]]:
    """Fine-tune a new LoRA adapter on `model` (left with the adapter injected); returns
    the adapter and the loss of every step. The global RNG is left as it was."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    rank, alpha = options["rank"], options["alpha"] or 2 * options["rank"]
    config = peft_config(rank, alpha, options["targets"], rslora=options["rslora"])
    encoded = [encode(tokenizer, s, options["max_length"], options.get("system")) for s in samples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options["seed"])
        peft_model = get_peft_model(model, LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=options["targets"], lora_dropout=0.0,
            use_rslora=options["rslora"]))
        peft_model.train()
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=options["lr"])
        order = sample_order(len(encoded), options["batch_size"], options["steps"],
                             torch.Generator().manual_seed(options["seed"]))
        for step, indices in enumerate(order, start=1):
            loss = peft_model(**batch([encoded[i] for i in indices], pad_id)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            on_step(step, options["steps"], losses[-1])
    tensors = {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(peft_model).items()}
    return adapter_from_peft(tensors, config), losses
