"""`cfmc run` on artifacts it cannot run: a package the command needs is missing (E217),
the tokenizer is missing or broken (E218), config.json is broken (E219). Each is a
located diagnostic with exit 1, never an internal error; tiny random models only."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cfmlang.cli import is_dependency, main
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
