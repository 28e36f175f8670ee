"""What ROME and MEMIT share: a causal LM in memory, the FFN keys at a subject's last
token, the optimisation of a value vector, and key second-moment statistics.

Math after Meng et al., "Locating and Editing Factual Associations in GPT" (ROME) and
"Mass-Editing Memory in a Transformer" (MEMIT). In a Llama block the FFN is
`down_proj(act(gate_proj(x)) * up_proj(x))`: the *key* of a token at layer l is the input
of `down_proj`, its *value* the output; an edit changes `down_proj.weight` so that the key
of the subject maps to a value that makes the model predict the target.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from cfmlang.architectures import head_logits, layer_module


Log = Callable[[str], None]


@dataclass(frozen=True)
class Request:
    """One fact to write: `prompt` contains `subject`; `target` is the new completion."""

    prompt: str
    subject: str
    target: str


@dataclass(frozen=True)
class ValueSearch:
    """Settings of the value optimisation (ROME's `compute_v`, MEMIT's `compute_z`)."""

    steps: int
    lr: float
    kl_factor: float
    weight_decay: float
    clamp_norm: float


class EditError(Exception):
    """An edit that cannot be made (a subject not found in its prompt, a target the
    tokenizer turns into nothing ...)."""

    def __init__(self, message: str, help: str = ""):
        super().__init__(message)
        self.help = help


def down_proj(model, layer: int) -> torch.nn.Linear:
    """The FFN down projection of a layer: its input is the key, its output the value."""
    return layer_module(model, layer, "ffn.down")


def subject_last_token(tokenizer, text: str, subject: str) -> int:
    """Index of the token holding the last character of the last `subject` in `text`."""
    start = text.rfind(subject)
    if start < 0:
        raise EditError(f"subject `{subject}` does not occur in `{text}`",
                        "write the subject exactly as it appears in the prompt")
    last_char = start + len(subject) - 1
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    for index, (begin, end) in enumerate(offsets):
        if begin <= last_char < end:
            return index
    raise EditError(f"no token of `{text}` holds the end of subject `{subject}`")


def encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded batch: token positions do not move with padding."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def padded(tokenizer, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded batch of token-id lists (prompt and target tokenized apart, so a
    target's tokens never merge with the prompt's)."""
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def target_ids(tokenizer, target: str) -> list[int]:
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise EditError(f"target `{target}` is empty after tokenisation", "give a non-empty target")
    return ids


@contextlib.contextmanager
def captured_keys(model, layer: int) -> Iterator[list[torch.Tensor]]:
    """Collect the inputs of `down_proj` at `layer` during the forward passes inside."""
    seen: list[torch.Tensor] = []
    handle = down_proj(model, layer).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def added_to_mlp_output(model, layer: int, rows: list[int], positions: list[int],
                        delta: torch.Tensor) -> Iterator[None]:
    """Add `delta` to the FFN output of `layer` at (rows[i], positions[i])."""
    rows_t, positions_t = torch.tensor(rows), torch.tensor(positions)

    def hook(module, args, output):
        shift = torch.zeros_like(output)
        shift[rows_t, positions_t] = delta.to(output.dtype)
        return output + shift

    handle = down_proj(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Enough(Exception):
    """Raised inside a forward pass once the module whose output is wanted has run."""


def forward_until(model, module: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Run the model body on `batch` until `module` has run (with the hooks registered on
    it before this call), and no further: the later layers and the output layer over
    every position would compute nothing the caller reads. Returns `module`'s output."""
    reached = []

    def stop(module, args, output):
        reached.append(output)
        raise _Enough

    handle = module.register_forward_hook(stop)
    try:
        with torch.no_grad(), contextlib.suppress(_Enough):
            model.base_model(**batch)
    finally:
        handle.remove()
    return reached[0]


def keys_at(model, tokenizer, layer: int, texts: list[str], subjects: list[str]) -> torch.Tensor:
    """[len(texts), ffn] keys at each text's subject-last token (one batched pass, up to
    `layer`)."""
    positions = [subject_last_token(tokenizer, t, s) for t, s in zip(texts, subjects)]
    with captured_keys(model, layer) as seen:
        forward_until(model, down_proj(model, layer), encode(tokenizer, texts))
    return seen[0][torch.arange(len(texts)), torch.tensor(positions)].double()


def averaged_keys(model, tokenizer, layer: int, requests: list[Request],
                  prefixes: tuple[str, ...]) -> torch.Tensor:
    """[n, ffn]: per request, the key at the subject's last token averaged over the
    prompt written after each prefix (ROME's k*, MEMIT's per-layer keys)."""
    texts = [p + r.prompt for r in requests for p in prefixes]
    subjects = [r.subject for r in requests for _ in prefixes]
    keys = keys_at(model, tokenizer, layer, texts, subjects)
    return keys.reshape(len(requests), len(prefixes), -1).mean(1)


def mlp_output_at(model, tokenizer, layer: int, request: Request) -> torch.Tensor:
    """The FFN output at `layer` at the subject's last token of the bare prompt."""
    position = subject_last_token(tokenizer, request.prompt, request.subject)
    output = forward_until(model, down_proj(model, layer), encode(tokenizer, [request.prompt]))
    return output[0, position].double()


@dataclass(frozen=True)
class ValueResult:
    """The optimised value: `initial + delta` is the FFN output at `layer` (ROME) or
    the residual stream after `layer` (MEMIT) that yields the target."""

    initial: torch.Tensor
    delta: torch.Tensor
    target_probability: float
    steps: int


@contextlib.contextmanager
def frozen(model) -> Iterator[None]:
    """No weight gradients inside (the value search differentiates with respect to
    `delta` only: skipping the weights' gradients halves the backward pass)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def logits_at(model, batch: dict[str, torch.Tensor], rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits at (rows, positions) only: the LM head (the largest matrix of a small
    model) runs on the few positions a loss reads, not on every token."""
    hidden = model.base_model(**batch).last_hidden_state
    return head_logits(model, hidden[rows, positions]).float()


def optimise_value(model, tokenizer, layer: int, request: Request, prefixes: tuple[str, ...],
                   search: ValueSearch, log: Log = lambda msg: None) -> ValueResult:
    """Find `delta` which, added to the FFN output of `layer` at the subject's last token,
    makes the model predict the target after every prefix; a KL term keeps the model's
    view of the subject itself ("<subject> is a") close to the original, a decay term and
    a norm clamp keep `delta` small relative to the original output."""
    ids = target_ids(tokenizer, request.target)
    texts = [p + request.prompt for p in prefixes] + [f"{request.subject} is a"]
    positions = [subject_last_token(tokenizer, t, request.subject) for t in texts]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    rewrite_rows = len(prefixes)
    # the logits at the last prompt token and at each target token but the last predict the
    # target; in "<subject> is a" the logits at the subject's last token carry the KL term
    label_pos = [[len(r) - 1 + i for i in range(len(ids))] for r in rows[:rewrite_rows]]
    read_rows = torch.tensor([row for row in range(rewrite_rows) for _ in ids] + [rewrite_rows])
    read_positions = torch.tensor([p for row in label_pos for p in row] + [positions[-1]])
    batch = padded(tokenizer, [r + ids[:-1] for r in rows[:rewrite_rows]] + rows[rewrite_rows:])
    labels = torch.tensor(ids * rewrite_rows)
    initial = mlp_output_at(model, tokenizer, layer, request).float()
    delta = torch.zeros_like(initial, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=search.lr)
    max_norm = search.clamp_norm * initial.norm()
    kl_reference = None
    probability, step = 0.0, 0
    with frozen(model):
        for step in range(1, search.steps + 1):
            optimiser.zero_grad()
            with added_to_mlp_output(model, layer, list(range(len(texts))), positions, delta):
                logits = logits_at(model, batch, read_rows, read_positions)
            log_probs = torch.log_softmax(logits[:-1], -1)
            picked = log_probs[torch.arange(len(labels)), labels].view(rewrite_rows, len(ids))
            nll = -picked.mean(1).mean()
            kl_log_probs = torch.log_softmax(logits[-1], -1)
            if kl_reference is None:
                kl_reference = kl_log_probs.detach()
            kl = torch.nn.functional.kl_div(kl_log_probs, kl_reference, log_target=True, reduction="sum")
            decay = delta.norm() / initial.norm() ** 2
            loss = nll + search.kl_factor * kl + search.weight_decay * decay
            probability = float(picked.detach().sum(1).exp().mean())
            log(f"    step {step:2d}: loss {loss.item():.3f} (nll {nll.item():.3f}, kl {kl.item():.4f}), "
                f"p(target) {probability:.3f}")
            if nll.item() < 5e-2 or step == search.steps:
                break
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return ValueResult(initial.double(), delta.detach().double(), probability, step)


def residual_after(model, tokenizer, layer: int, requests: list[Request]) -> torch.Tensor:
    """[n, hidden]: the residual stream leaving block `layer` at each bare prompt's
    subject-last token."""
    positions = [subject_last_token(tokenizer, r.prompt, r.subject) for r in requests]
    output = forward_until(model, layer_module(model, layer), encode(tokenizer, [r.prompt for r in requests]))
    hidden = output[0] if isinstance(output, tuple) else output
    return hidden[torch.arange(len(requests)), torch.tensor(positions)].double()


@dataclass(frozen=True)
class KeyMoments:
    """Second moment E[k k^T] of the keys at one layer ([ffn, ffn], float64), with what
    its shrinkage needs: the number of keys and the sum of |k|^4."""

    moment: torch.Tensor
    count: int
    fourth: float

    def shrunk(self) -> torch.Tensor:
        """Ledoit-Wolf shrinkage towards (mean eigenvalue) I with the weight that
        minimises the expected squared error of the estimate: a moment measured on few
        keys per dimension underestimates its small eigenvalues, and C^-1 k would then
        reach far into directions that held-out keys also use."""
        moment, size = self.moment, len(self.moment)
        scale = moment.diagonal().mean()
        spread = (moment - scale * torch.eye(size, dtype=moment.dtype)).pow(2).sum()
        noise = self.fourth / self.count ** 2 - moment.pow(2).sum() / self.count
        weight = float((noise / spread).clamp(0, 1)) if spread > 0 else 0.0
        return (1 - weight) * moment + (weight + 1e-6) * scale * torch.eye(size, dtype=moment.dtype)


def key_second_moments(model, layers: list[int], tokens: torch.Tensor, batch_size: int = 16) -> dict[int, KeyMoments]:
    """Key statistics over every position of the `tokens` rows at each of `layers`; the
    forward passes stop at the deepest of them (nothing after it is needed)."""
    totals: dict[int, torch.Tensor] = {}
    fourth: dict[int, float] = {}
    for start in range(0, len(tokens), batch_size):
        with contextlib.ExitStack() as stack:
            seen = {layer: stack.enter_context(captured_keys(model, layer)) for layer in layers}
            forward_until(model, down_proj(model, max(layers)), {"input_ids": tokens[start:start + batch_size]})
        for layer in layers:   # float32 products (as ROME's statistics), summed in float64
            keys = seen[layer][0].flatten(0, 1)
            totals[layer] = totals.get(layer, 0) + (keys.T @ keys).double()
            fourth[layer] = fourth.get(layer, 0.0) + float(keys.double().norm(dim=1).pow(4).sum())
    return {layer: KeyMoments(total / tokens.numel(), tokens.numel(), fourth[layer])
            for layer, total in totals.items()}
