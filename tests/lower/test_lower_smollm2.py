"""The export target on the real SmolLM2-135M-Instruct: logits, greedy tokens against HF
generate, a fresh-process reload of the .pt2, and `cfmc run` on the lowered program."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import cfmlang
from cfmlang.cli import main
from cfmlang.cachedir import default_cache_dir
from cfmlang.runtime.run import encode
from paths import REPO, TESTS

EXAMPLE = REPO / "examples" / "smol.brick"
FRESH_PROCESS = TESTS / "reload_pt2.py"
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol_export") / "artifact"
    cfmlang.compile(EXAMPLE, out, cache_dir=default_cache_dir(), target="export")
    return out


@pytest.fixture(scope="module")
def chat_prompt(smol_export) -> torch.Tensor:
    from transformers import AutoTokenizer

    return encode(AutoTokenizer.from_pretrained(smol_export), PROMPT, chat=True)["input_ids"]


def test_smollm2_export_logits_match_eager(smol_export, chat_prompt):
    lowered, eager = cfmlang.load(smol_export), cfmlang.load(smol_export, target="eager")
    length = chat_prompt.shape[1]
    with torch.inference_mode():
        reference = eager(chat_prompt).logits
        logits, cache = lowered.prefill(chat_prompt[:, :length - 2], length + 4)
        assert (logits - reference[:, :length - 2]).abs().max() < 1e-4
        for position in (length - 2, length - 1):
            logits, cache = lowered.decode(chat_prompt[:, position], position, cache)
            assert (logits[:, 0] - reference[:, position]).abs().max() < 1e-4


def test_smollm2_export_generates_hf_greedy_tokens_also_after_a_fresh_reload(smol_export, chat_prompt):
    from transformers import AutoTokenizer

    lowered, eager = cfmlang.load(smol_export), cfmlang.load(smol_export, target="eager")
    with torch.inference_mode():
        theirs = eager.generate(chat_prompt, max_new_tokens=24, do_sample=False, temperature=None, top_p=None,
                                top_k=None, pad_token_id=2)
    ours = lowered.generate(chat_prompt, max_new_tokens=24)
    assert torch.equal(ours, theirs)
    text = AutoTokenizer.from_pretrained(smol_export).decode(ours[0, chat_prompt.shape[1]:])
    assert "Paris" in text
    out = subprocess.run([sys.executable, str(FRESH_PROCESS), str(smol_export),
                          json.dumps(chat_prompt[0].tolist()), "12"], capture_output=True, text=True, check=True)
    expected = theirs[0, chat_prompt.shape[1]:][:12].tolist()       # HF stops at the end-of-turn token
    assert json.loads(out.stdout.strip().splitlines()[-1])[:len(expected)] == expected


def test_cfmc_run_streams_from_the_lowered_program(smol_export):
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["run", str(smol_export), "--prompt", PROMPT, "--max-new-tokens", "16"]) == 0
    assert "Paris" in out.getvalue()
    sampled = io.StringIO()
    with redirect_stdout(sampled):
        assert main(["run", str(smol_export), "--prompt", PROMPT, "--max-new-tokens", "8", "--sample",
                     "--seed", "3"]) == 0
    assert sampled.getvalue().strip()
