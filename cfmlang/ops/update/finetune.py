"""`update` method `finetune`: train only the selected bricks of a model on a dataset
(on CPU), everything else frozen; deterministic under the seed."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field

from cfmlang.io.datafile import read_data_text

from cfmlang.ops.update.editing import Log
from cfmlang.ops.registry import Method, Params, register


@register
class Finetune(Method):
    keyword = "update"
    name = "finetune"
    summary = "train only the selected layers (or the blocks a grow added) on a text dataset"

    class Options(Params):
        steps: Annotated[int, Field(ge=1, le=100000)] = 50
        lr: Annotated[float, Field(gt=0)] = 1e-3
        batch_size: Annotated[int, Field(ge=1, le=1024)] = 4
        max_length: Annotated[int, Field(ge=2, le=8192)] = 64
        weight_decay: Annotated[float, Field(ge=0)] = 0.0


class DataError(Exception):
    """A dataset that cannot be used (unreadable, not JSON, no `text`, too short)."""


def read_texts(path: Path) -> list[str]:
    """The samples of a dataset: each line's `text` of a .jsonl file, or the whole of
    any other file (split into blocks after tokenisation)."""
    try:
        raw = read_data_text(path)
    except FileNotFoundError:
        raise DataError("no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(str(exc)) from None
    if path.suffix != ".jsonl":
        if not raw.strip():
            raise DataError("the file is empty")
        return [raw]
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"line {number} is not JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise DataError(f'line {number} has no non-empty "text"')
        texts.append(item["text"])
    if not texts:
        raise DataError("the file has no samples")
    return texts


def blocks(tokenizer, texts: list[str], max_length: int) -> list[torch.Tensor]:
    """Token blocks of at most `max_length` (a long text is cut into consecutive blocks);
    blocks shorter than 2 tokens teach nothing and are dropped."""
    out = []
    for text in texts:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        out += [b for b in ids.split(max_length) if len(b) >= 2]
    if not out:
        raise DataError("no sample is two tokens or longer")
    return out


def batch_loss(model, samples: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of a right-padded batch."""
    length = max(len(s) for s in samples)
    ids = torch.full((len(samples), length), pad_id)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)], mask[row, :len(sample)] = sample, 1
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def mean_loss(model, data: list[torch.Tensor], batch_size: int, pad_id: int) -> float:
    with torch.no_grad():
        losses = [batch_loss(model, data[i:i + batch_size], pad_id) for i in range(0, len(data), batch_size)]
    return float(torch.stack(losses).mean())


@dataclass(frozen=True)
class Training:
    """The trained tensors (by name) and how the loss went."""

    weights: dict[str, torch.Tensor]
    loss_curve: list[float]
    loss_before: float
    loss_after: float


def select(model, prefixes: tuple[str, ...]) -> dict[str, torch.nn.Parameter]:
    """Freeze everything; unfreeze and return the parameters under the given prefixes."""
    chosen = {}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(name.startswith(p) for p in prefixes))
        if parameter.requires_grad:
            chosen[name] = parameter
    return chosen


def finetune(model, tokenizer, prefixes: tuple[str, ...], texts: list[str], options: dict, seed: int,
             log: Log) -> Training:
    """AdamW on the selected parameters only, batches drawn in a seeded order."""
    data = blocks(tokenizer, texts, options["max_length"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trained = select(model, prefixes)
    before = mean_loss(model, data, options["batch_size"], pad_id)
    log(f"  finetune: {sum(p.numel() for p in trained.values())} parameters in {len(trained)} tensors, "
        f"{len(data)} blocks, loss {before:.4f}")
    optimiser = torch.optim.AdamW(list(trained.values()), lr=options["lr"], weight_decay=options["weight_decay"])
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    curve = []
    for step in range(1, options["steps"] + 1):
        while len(order) < options["batch_size"]:
            order += torch.randperm(len(data), generator=generator).tolist()
        picked, order = order[:options["batch_size"]], order[options["batch_size"]:]
        optimiser.zero_grad()
        loss = batch_loss(model, [data[i] for i in picked], pad_id)
        loss.backward()
        optimiser.step()
        curve.append(loss.item())
        log(f"    step {step}/{options['steps']}: loss {curve[-1]:.4f}")
    after = mean_loss(model, data, options["batch_size"], pad_id)
    log(f"  finetune: loss {before:.4f} -> {after:.4f}")
    return Training({n: p.detach().clone() for n, p in trained.items()}, curve, before, after)
