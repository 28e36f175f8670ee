"""Compile a .brick file to every requested lowering target and check each lowered program
against the eager model of the same artifact, on one device:

- prefill logits and two single-token decode steps through the KV cache (max |diff|),
- greedy tokens of `generate` against transformers' `generate` (chat prompt, 24 tokens),
- for `export`, greedy tokens after `torch.export.load` in a fresh process (CPU only),
- for float32 programs on CPU, how far eager float32 and the lowered program each are from
  the eager model run in float64 (prefill logits): the size of float32 rounding in this
  model, to read the lowered program's difference against (reported, not a pass criterion).

Prints one JSON object per target and a summary; exits 1 when a float32 program is off by
more than --tolerance or its greedy tokens differ (float16/bfloat16 programs are reported,
with a 5e-2 logit tolerance, since reduced precision may flip close greedy choices).

    python benchmarks/lower_check.py --brick examples/smol.brick --targets export inductor
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cfmlang  # noqa: E402
from cfmlang.compiler.lower import LowerOptions  # noqa: E402
from cfmlang.runtime.run import encode  # noqa: E402

PROMPT = "What is the capital of France?"


def check_target(brick: Path, target: str, device: str, out: Path, precision: str | None) -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    options = LowerOptions(target=target, device=device, precision=precision)
    cfmlang.compile(brick, out / target, lowering=options)
    compile_seconds = time.perf_counter() - started
    lowered = cfmlang.load(out / target, device=device)
    eager = cfmlang.load(out / target, target="eager", dtype=lowered.dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / target)
    prompt = encode(tokenizer, PROMPT, chat=bool(tokenizer.chat_template))["input_ids"].to(device)
    length = prompt.shape[1]
    with torch.inference_mode():
        reference = eager(prompt).logits.float()
        prefill_logits, cache = lowered.prefill(prompt[:, :length - 2], length + 4)
        prefill_worst = (prefill_logits.float() - reference[:, :length - 2]).abs().max().item()
        decode_worst = 0.0
        for position in (length - 2, length - 1):
            logits, cache = lowered.decode(prompt[:, position], position, cache)
            decode_worst = max(decode_worst, (logits[:, 0].float() - reference[:, position]).abs().max().item())
        theirs = eager.generate(prompt, max_new_tokens=24, do_sample=False, temperature=None, top_p=None,
                                top_k=None, pad_token_id=tokenizer.eos_token_id)
    ours = lowered.generate(prompt, max_new_tokens=24, pad_token_id=tokenizer.eos_token_id)
    report = {"target": target, "device": device, "dtype": str(lowered.dtype).removeprefix("torch."),
              "compile_seconds": round(compile_seconds, 1), "max_abs_logit_diff": max(prefill_worst, decode_worst),
              "prefill_max_abs_logit_diff": prefill_worst, "decode_max_abs_logit_diff": decode_worst,
              "same_greedy_tokens": torch.equal(ours.cpu(), theirs.cpu()),
              "text": tokenizer.decode(ours[0, length:], skip_special_tokens=True)}
    if device == "cpu" and lowered.dtype == torch.float32:
        report.update(float64_distances(out / target, prompt[:, :length - 2], reference[:, :length - 2],
                                        prefill_logits))
    if target == "export" and device == "cpu":
        expected = theirs[0, length:length + 12].tolist()      # transformers stops at end of turn
        report["fresh_process_same_tokens"] = fresh_process_tokens(out / target, prompt, 12)[:len(expected)] == expected
    return report


def float64_distances(directory: Path, prompt: torch.Tensor, eager_logits: torch.Tensor,
                      lowered_logits: torch.Tensor) -> dict:
    """Max |logit - float64 logit| over the prefill of `prompt`, for eager float32 and the
    lowered program."""
    with torch.inference_mode():
        exact = cfmlang.load(directory, target="eager", dtype=torch.float64).eval()(prompt).logits
    return {"eager_float32_vs_float64_prefill": (eager_logits.double() - exact).abs().max().item(),
            "lowered_vs_float64_prefill": (lowered_logits.double() - exact).abs().max().item()}


def fresh_process_tokens(directory: Path, prompt: torch.Tensor, count: int) -> list[int]:
    script = ROOT / "tests" / "reload_pt2.py"
    out = subprocess.run([sys.executable, str(script), str(directory), json.dumps(prompt[0].tolist()), str(count)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def passed(report: dict, tolerance: float) -> bool:
    if report["dtype"] != "float32":
        return report["max_abs_logit_diff"] < 5e-2
    return (report["max_abs_logit_diff"] < tolerance and report["same_greedy_tokens"]
            and report.get("fresh_process_same_tokens", True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brick", type=Path, default=ROOT / "examples" / "smol.brick")
    parser.add_argument("--targets", nargs="+", default=["export", "inductor"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", help="cast the graph (default: the artifact's dtype; tensorrt float16)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "lower_check")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    failures = []
    for target in args.targets:
        report = check_target(args.brick, target, args.device, args.out, args.precision)
        report["passed"] = passed(report, args.tolerance)
        print(json.dumps(report), flush=True)
        if not report["passed"]:
            failures.append(target)
    print(f"lower_check: {len(args.targets) - len(failures)}/{len(args.targets)} targets passed"
          + (f"; failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
