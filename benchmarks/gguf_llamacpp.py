"""SmolLM2 compiled with `--target gguf --quant q8_0`, run by llama.cpp built from source,
beside the same model compiled with `--target inductor`, in one run.

1. llama.cpp: the `llama-cpp-python` sdist (which vendors llama.cpp) is downloaded with
   pip, unpacked and built with CMake (`llama-simple`, `llama-bench`) into `--work`
   (default `benchmarks/work/llamacpp/`, git-ignored), once; later runs reuse the build.
2. `examples/smol.brick` is compiled twice: `--target gguf --quant q8_0` and
   `--target inductor`.
3. Greedy text: for three chat prompts, `llama-simple` (greedy sampling) continues the
   chat-templated prompt from the GGUF file; transformers' greedy `generate` on the
   artifact's own weights (the original) and cfmlang's inductor program continue it too.
   The three continuations must be the same text.
4. Speed: `llama-bench` (prompt processing and token generation tokens/s) on the GGUF
   file, and `cfmc bench`'s decode tokens/s of the inductor program (batch 1, the same
   prompt and generation lengths), with the load average before and after.

    python benchmarks/gguf_llamacpp.py [--threads 2] [--new-tokens 32] [--json out.json]

Exits 1 when a continuation differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "How do I sort a list in Python?")
TOOLS = ("llama-simple", "llama-bench")


def llama_cpp(work: Path, jobs: int) -> Path:
    """The folder of the built llama.cpp tools (built on first use)."""
    build = work / "build"
    if all((build / "bin" / tool).is_file() for tool in TOOLS):
        return build / "bin"
    work.mkdir(parents=True, exist_ok=True)
    sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps",
                        "llama-cpp-python", "-d", str(work)], check=True)
        sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
    source = work / sdists[-1].name.removesuffix(".tar.gz")
    if not source.is_dir():
        with tarfile.open(sdists[-1]) as archive:
            archive.extractall(work, filter="data")
    subprocess.run(["cmake", "-S", str(source / "vendor" / "llama.cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(jobs)], check=True)
    return build / "bin"


def compile_smollm2(out: Path, target: str, *extra: str) -> Path:
    from cfmlang.cli import main

    if main(["compile", str(ROOT / "examples" / "smol.brick"), "-o", str(out / target), "--target", target,
             "-q", *extra]) != 0:
        raise SystemExit(f"compiling examples/smol.brick --target {target} failed")
    return out / target


def chat_text(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def llama_simple(tools: Path, gguf: Path, text: str, new_tokens: int) -> str:
    """llama.cpp's greedy continuation of `text` (llama-simple prints the prompt, then it)."""
    done = subprocess.run([str(tools / "llama-simple"), "-m", str(gguf), "-n", str(new_tokens), text],
                          capture_output=True, text=True, check=True)
    return done.stdout.removeprefix(text)


def transformers_greedy(model, tokenizer, text: str, new_tokens: int) -> str:
    import torch

    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.eos_token_id)
    return _until_eos(tokenizer, out[0, ids.shape[1]:].tolist())


def lowered_greedy(model, tokenizer, text: str, new_tokens: int) -> str:
    import torch

    ids = torch.tensor([tokenizer(text)["input_ids"]])
    out = model.generate(ids, max_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)
    return _until_eos(tokenizer, out[0, ids.shape[1]:].tolist())


def _until_eos(tokenizer, tokens: list[int]) -> str:
    """The text of the tokens before the first end of generation (llama-simple stops there
    and does not print it)."""
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens)


def llama_bench(tools: Path, gguf: Path, threads: int, prompt_tokens: int, new_tokens: int) -> dict:
    done = subprocess.run([str(tools / "llama-bench"), "-m", str(gguf), "-p", str(prompt_tokens), "-n",
                           str(new_tokens), "-t", str(threads), "-r", "3", "-o", "json"],
                          capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    return {("prefill" if row["n_prompt"] else "decode"): row["avg_ts"] for row in rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "llamacpp")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cfmlang
    from cfmlang.runtime.bench import bench

    torch.set_num_threads(args.threads)
    tools = llama_cpp(args.work, args.threads)
    out = args.work / "artifacts"
    gguf_dir = compile_smollm2(out, "gguf", "--quant", "q8_0")
    inductor_dir = compile_smollm2(out, "inductor")
    gguf = gguf_dir / "lowered" / "model.gguf"

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir)
    original = AutoModelForCausalLM.from_pretrained(gguf_dir, dtype=torch.float32).eval()
    lowered = cfmlang.load(inductor_dir)
    greedy = []
    for prompt in PROMPTS:
        text = chat_text(tokenizer, prompt)
        row = {"prompt": prompt, "transformers": transformers_greedy(original, tokenizer, text, args.new_tokens),
               "llama.cpp": llama_simple(tools, gguf, text, args.new_tokens),
               "inductor": lowered_greedy(lowered, tokenizer, text, args.new_tokens)}
        row["same"] = row["transformers"] == row["llama.cpp"] == row["inductor"]
        greedy.append(row)
        print(json.dumps(row))

    load_before = os.getloadavg()
    llama = llama_bench(tools, gguf, args.threads, args.prompt_tokens, args.new_tokens)
    ours = bench(inductor_dir, batches=(1,), prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    row = ours["results"][0]
    load_after = os.getloadavg()
    speed = {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
             "llama.cpp q8_0 prefill tok/s": round(llama["prefill"], 2),
             "llama.cpp q8_0 decode tok/s": round(llama["decode"], 2),
             "cfmlang inductor prefill tok/s": row["prefill"]["compiled_tokens_per_s"],
             "cfmlang inductor decode tok/s": row["decode"]["compiled_tokens_per_s"],
             "HF eager decode tok/s (anchor of cfmc bench)": row["decode"]["eager_tokens_per_s"],
             "decode ratio llama.cpp / inductor": round(llama["decode"] / row["decode"]["compiled_tokens_per_s"], 3),
             "load average before": load_before, "load average after": load_after}
    print(json.dumps(speed))
    if args.json:
        args.json.write_text(json.dumps({"greedy": greedy, "speed": speed}, indent=2))
    same = all(row["same"] for row in greedy)
    print(f"greedy continuations: {sum(r['same'] for r in greedy)} of {len(greedy)} prompts the same")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
