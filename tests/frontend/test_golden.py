"""Golden diagnostics: every file in tests/golden/errors/ states the diagnostics it must
produce, every file in tests/golden/ok/ must check clean.

Annotations are comment lines at the top of a golden file:

    # expect: E013 line 7                        a diagnostic at line 7 of this file
    # expect: E013 line 7 "did you mean `dtype`?"  ... whose message/help/notes contain the text
    # expect: W002 line 4 in lib/with_settings.brick   ... at line 4 of an imported file

Warnings count as diagnostics too (an error run carries them; an ok run has them in
`program.warnings`). The multiset of (file, code, line) must match exactly.

Each case is copied into its own tmp dir next to a `models/` folder of tiny real models
(built once per session) and a copy of tests/golden/errors/lib/, so that relative paths
like `hf "models/llama_a"` and `import "lib/shared_models.brick"` resolve.
"""
from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cfmlang
from cfmlang.cli import main
from cfmlang.diagnostics import CompileError
from models import peft_adapter, tiny_model
from paths import TESTS

GOLDEN = TESTS / "golden"
ERRORS = sorted((GOLDEN / "errors").glob("*.brick"))
OK = sorted((GOLDEN / "ok").glob("*.brick"))
LIB = GOLDEN / "errors" / "lib"

EXPECT = re.compile(r'^#\s*expect:\s*([EW]\d{3})\s+line\s+(\d+)'
                    r'(?:\s+in\s+(\S+))?(?:\s+"(.*)")?\s*$')

# Golden files annotated with the CORRECT expectation that cfmlang does not meet yet.
# Each is a known bug; strict, so a fix makes the test pass loudly (then drop the entry).
KNOWN_BUGS: dict[str, str] = {}


# ---------------------------------------------------------------- the model folder

def build_models(models: Path) -> Path:
    """Tiny real models, plus deliberately broken ones for the source diagnostics."""
    models.mkdir(parents=True)
    a = tiny_model(models / "llama_a", seed=1)
    tiny_model(models / "llama_b", seed=2)
    tiny_model(models / "mistral_a", seed=3, arch="mistral")
    tiny_model(models / "wide", seed=4, hidden_size=64)             # E060: hidden_size
    tiny_model(models / "shallow", seed=5, num_hidden_layers=2)     # E060: num_layers
    tiny_model(models / "biased", seed=6, attention_bias=True)      # E113: upcycle needs no biases
    tiny_gpt2(models / "gpt2")                                        # E280: Conv1D projections
    config, weights = a / "config.json", a / "model.safetensors"
    tensors = load_file(weights)

    def folder(name: str, with_config: bool = True) -> Path:
        path = models / name
        path.mkdir()
        if with_config:
            shutil.copy(config, path)
        return path

    # E061: same config and tensor count, one tensor transposed
    reshaped = dict(tensors)
    name = "model.layers.0.mlp.gate_proj.weight"
    reshaped[name] = reshaped[name].t().contiguous()
    save_file(reshaped, folder("reshaped") / "model.safetensors", metadata={"format": "pt"})
    # E062: one tensor missing
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"},
              folder("missing_tensor") / "model.safetensors", metadata={"format": "pt"})
    # E052: pickled weights only
    torch.save(tensors, folder("pickled") / "pytorch_model.bin")
    # E051: the many ways a source is unreadable
    shutil.copy(weights, folder("noconfig", with_config=False))
    raw = weights.read_bytes()
    (folder("corrupt") / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    (folder("badheader") / "model.safetensors").write_bytes(b"\xff" * 8 + b"garbage")
    (folder("stub") / "model.safetensors").write_bytes(b"\x01\x02")
    shutil.copy(weights, folder("badjson", with_config=False))
    (models / "badjson" / "config.json").write_text("{not json")
    folder("noweights")
    shutil.copy(weights, folder("badconfig", with_config=False))
    (models / "badconfig" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder("lostshard") / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00002.safetensors" for k in tensors}}))
    (models / "fake.gguf").write_text("this is not a GGUF file")
    # LoRA bricks: a PEFT adapter of llama_a, and training data
    peft_adapter(models / "adapter_ok", a, seed=1)
    (models / "pirate.jsonl").write_text('{"prompt": "hi", "response": "arr"}\n')
    # E141: an integer tensor in a merged model
    save_file({**tensors, "model.norm.weight": tensors["model.norm.weight"].to(torch.int64)},
              folder("int_tensor") / "model.safetensors", metadata={"format": "pt"})
    return models


def tiny_gpt2(folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128)).save_pretrained(folder)


@pytest.fixture(scope="session")
def golden_models(tmp_path_factory) -> Path:
    return build_models(tmp_path_factory.mktemp("golden") / "models")


@pytest.fixture
def place(golden_models, tmp_path):
    """Copy a golden file (and lib/) into a tmp dir beside `models/`; return its path."""
    def place(source: Path) -> Path:
        (tmp_path / "models").symlink_to(golden_models, target_is_directory=True)
        shutil.copytree(LIB, tmp_path / "lib")
        target = tmp_path / source.name
        shutil.copy(source, target)
        return target
    return place


# ---------------------------------------------------------------- annotations

def expectations(path: Path) -> list[tuple[str, str, int, str | None]]:
    """(file relative to the case dir, code, line, text) for every `# expect:` line."""
    out = []
    for line in path.read_text().splitlines():
        if not line.lstrip().startswith("#"):
            continue
        match = EXPECT.match(line.strip())
        if match:
            code, number, file, text = match.groups()
            out.append((file or path.name, code, int(number), text))
        else:
            assert "expect:" not in line, f"malformed annotation in {path.name}: {line!r}"
    return out


def relative(file: str, case: Path) -> str:
    path = Path(file)
    try:
        return path.resolve().relative_to(case.parent.resolve()).as_posix()
    except ValueError:
        return file


def located(diagnostics, case: Path) -> Counter:
    return Counter((relative(d.span.file, case) if d.span else None, d.code,
                    d.span.line if d.span else None) for d in diagnostics)


def expected_counter(case: Path, source: Path) -> Counter:
    return Counter((f, code, line) for f, code, line, _ in expectations(source))


def assert_texts(diagnostics, case: Path, source: Path) -> None:
    for file, code, line, text in expectations(source):
        if text is None:
            continue
        found = [d for d in diagnostics if d.code == code and d.span and d.span.line == line
                 and relative(d.span.file, case) == file]
        blob = ["\n".join((d.message,) + d.help + d.notes) for d in found]
        assert any(text in b for b in blob), \
            f"{code} at {file}:{line}: no diagnostic mentions {text!r}; got {blob}"


def params(paths):
    out = []
    for path in paths:
        marks = ()
        if path.name in KNOWN_BUGS:
            marks = pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[path.name])
        out.append(pytest.param(path, id=path.name, marks=marks))
    return out


# ---------------------------------------------------------------- the tests

def test_golden_corpus_is_complete():
    assert len(ERRORS) >= 45
    assert not set(KNOWN_BUGS) - {p.name for p in ERRORS}, "KNOWN_BUGS names a missing file"
    codes = {code for path in ERRORS for _, code, _, _ in expectations(path)}
    wanted = {f"E00{i}" for i in range(1, 8)} | {
        "E010", "E011", "E012", "E013", "E014", "E015", "E020", "E021", "E022", "E030",
        "E032", "E033", "E040", "E041", "E050", "E051", "E052", "E053", "E060",
        "E061", "E062", "E111", "E112", "E113", "E114", "E115", "E116", "E140", "E141", "E144"}
    assert wanted <= codes, f"no golden file covers {sorted(wanted - codes)}"
    for path in ERRORS:
        assert expectations(path), f"{path.name} has no `# expect:` annotation"


@pytest.mark.parametrize("source", params(ERRORS))
def test_error_file(source: Path, place):
    case = place(source)
    with pytest.raises(CompileError) as info:
        cfmlang.check(case)
    diagnostics = info.value.diagnostics
    assert located(diagnostics, case) == expected_counter(case, source), \
        "\n".join(f"{d.code} {d.span and d.span.line}: {d.message}" for d in diagnostics)
    assert_texts(diagnostics, case, source)


@pytest.mark.parametrize("source", params(ERRORS))
def test_error_file_cli(source: Path, place, capsys):
    case = place(source)
    assert main(["check", str(case)]) == 1
    text = capsys.readouterr()
    assert "internal error" not in text.err and "Traceback" not in text.err
    assert main(["check", "--format", "json", str(case)]) == 1
    out = json.loads(capsys.readouterr().out)
    got = Counter((relative(d["span"]["file"], case) if "span" in d else None, d["code"],
                   d["span"]["line"] if "span" in d else None) for d in out["diagnostics"])
    assert got == expected_counter(case, source)


@pytest.mark.parametrize("source", params(OK))
def test_ok_file(source: Path, place, capsys):
    case = place(source)
    program = cfmlang.check(case)
    assert located(program.warnings, case) == expected_counter(case, source)
    assert_texts(program.warnings, case, source)
    assert main(["check", str(case)]) == 0
    assert "internal error" not in capsys.readouterr().err
