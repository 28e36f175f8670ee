"""The VS Code extension: its grammar tests match the examples, pass, and the .vsix builds."""
from __future__ import annotations

import shutil
import subprocess
import zipfile

import pytest

from grammar_annotations import ROOT, TESTS, expected_files

EXTENSION = ROOT / "editors" / "vscode"


def test_grammar_tests_cover_every_example():
    """editors/vscode/test/ holds one annotated copy of each example, as the parser sees it
    (rewrite them with `python tests/lsp/grammar_annotations.py`)."""
    written = {p.name: p.read_text() for p in TESTS.glob("*.brick")}
    assert written == expected_files()


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm")
def test_vsix_builds_and_grammar_passes():
    done = subprocess.run(["bash", str(EXTENSION / "build.sh")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("run successfuly") == len(list(TESTS.glob("*.brick")))
    with zipfile.ZipFile(EXTENSION / "cfmlang-brick.vsix") as vsix:
        names = set(vsix.namelist())
    assert {"extension/package.json", "extension/extension.js", "extension/syntaxes/brick.tmLanguage.json",
            "extension/language-configuration.json",
            "extension/node_modules/vscode-languageclient/node.js"} <= names
    assert not any(n.startswith("extension/test/") for n in names)
