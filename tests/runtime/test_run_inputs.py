"""`cfmc run` on artifacts it cannot run: a package the command needs is missing (E217),
the tokenizer is missing or broken (E218), config.json is broken (E219). Each is a
located diagnostic with exit 1, never an internal error; tiny random models only."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from cfmlang.cli import is_dependency, main
from cfmlang.diagnostics import CompileError
from models import peft_adapter, tiny_model, tiny_tokenizer

RUN = ["--prompt", "the sea", "--max-new-tokens", "3", "--no-chat"]


def compile_brick(folder: Path, text: str) -> Path:
    (folder / "m.brick").write_text(text)
    assert main(["compile", str(folder / "m.brick"), "-o", str(folder / "out")]) == 0
    return folder / "out"


def test_adapter_artifact_without_peft_names_the_package(tmp_path, monkeypatch, capsys):
    base = tiny_tokenizer(tiny_model(tmp_path / "base", seed=1))
    peft_adapter(tmp_path / "tone", base, seed=2)
    out = compile_brick(tmp_path, 'model base:\n  source: hf "base"\n'
                                  'brick tone:\n  kind: lora\n  source: peft "tone"\n  base: base\noutput: tone\n')
    assert (out / "adapter_config.json").is_file()
    assert main(["run", str(out), *RUN]) == 0            # runs while peft is there
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "peft", None)       # what an environment without peft answers
    assert main(["run", str(out), *RUN]) == 1
    err = capsys.readouterr().err
    assert "E217" in err and "`peft`" in err and "pip install peft" in err
    assert "internal error" not in err


def test_only_missing_packages_of_other_projects_are_user_errors(monkeypatch):
    assert is_dependency("surely_not_installed_pkg.sub")
    assert not is_dependency("cfmlang.no_such_module")          # cfmlang's own: a bug
    assert not is_dependency("transformers.no_such_submodule")  # installed, too old or too new: a bug
    assert not is_dependency(None)
    monkeypatch.setitem(sys.modules, "yaml", None)
    assert is_dependency("yaml")


@pytest.mark.parametrize("module, command", [("yaml", "pip install pyyaml"), ("peft.tuners", "pip install peft")])
def test_the_pip_command_names_the_distribution(module, command):
    from cfmlang.cli import missing_package

    diagnostic = missing_package(module)
    assert diagnostic.code == "E217" and command in " ".join(diagnostic.help)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A compiled tiny artifact with a tokenizer (module-scoped: each test copies it)."""
    folder = tmp_path_factory.mktemp("artifact")
    tiny_tokenizer(tiny_model(folder / "m", seed=3))
    return compile_brick(folder, 'model m:\n  source: hf "m"\noutput: m\n')


def broken_copy(artifact: Path, folder: Path, name: str, text: str | None) -> Path:
    """A copy of the artifact with file `name` replaced by `text` (removed when None)."""
    shutil.copytree(artifact, folder)
    if text is None:
        (folder / name).unlink()
    else:
        (folder / name).write_text(text)
    return folder


def run_fails(directory: Path, capsys) -> str:
    assert main(["run", str(directory), *RUN]) == 1
    err = capsys.readouterr().err
    assert "internal error" not in err and "Traceback" not in err
    return err


def test_the_intact_artifact_runs(artifact, capsys):
    assert main(["run", str(artifact), *RUN]) == 0
    assert capsys.readouterr().out.split()          # three new words were printed


def test_artifact_without_tokenizer_is_e218(artifact, tmp_path, capsys):
    bare = broken_copy(artifact, tmp_path / "a", "tokenizer.json", None)
    (bare / "tokenizer_config.json").unlink()
    err = run_fails(bare, capsys)
    assert "E218" in err and "holds no tokenizer" in err and "save_pretrained" in err
    # the model itself still loads from Python, as the help says
    import cfmlang
    assert cfmlang.load(bare).config.vocab_size == 128


BROKEN = [  # file, its new text, code, words the diagnostic holds
    ("tokenizer.json", '{"version": ', "E218", "tokenizer.json:1:13"),
    ("tokenizer.json", "[1, 2]", "E218", "does not hold a JSON object"),
    ("tokenizer.json", '{"model": 3}', "E218", "KeyError: 'added_tokens'"),
    ("tokenizer_config.json", '{"tokenizer_class": 5}', "E218", "the tokenizer in"),
    ("config.json", '{"model_type": \n', "E219", "config.json:2:1"),
    ("config.json", "[]", "E219", "does not hold a JSON object"),
    ("config.json", '{"model_type": "nonsense"}', "E219", "model type `nonsense`"),
    ("config.json", None, "E219", "config.json is missing"),
]


@pytest.mark.parametrize("name, text, code, words", BROKEN, ids=[f"{b[0]}:{b[3]}" for b in BROKEN])
def test_broken_artifact_files_are_located_diagnostics(artifact, tmp_path, capsys, name, text, code, words):
    err = run_fails(broken_copy(artifact, tmp_path / "a", name, text), capsys)
    assert f"[{code}]" in err and words in err


def test_config_value_of_the_wrong_kind_is_e219_from_python_too(artifact, tmp_path):
    import cfmlang

    config = json.loads((artifact / "config.json").read_text())
    broken = broken_copy(artifact, tmp_path / "a", "config.json", json.dumps({**config, "hidden_size": "abc"}))
    with pytest.raises(CompileError) as caught:
        cfmlang.load(broken)
    diagnostic, = caught.value.diagnostics
    assert diagnostic.code == "E219" and "hidden_size" in diagnostic.message


def test_weights_that_do_not_fit_config_are_e219(artifact, tmp_path, capsys):
    config = json.loads((artifact / "config.json").read_text())
    wider = broken_copy(artifact, tmp_path / "a", "config.json", json.dumps({**config, "intermediate_size": 96}))
    err = run_fails(wider, capsys)
    assert "[E219]" in err and f"the model in {wider}" in err
