from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> dict[str, Path]:
    """Three tiny Llama and three tiny Mistral models of one shape each."""
    root = tmp_path_factory.mktemp("zoo")
    zoo = {}
    for arch in ("llama", "mistral"):
        for i, name in enumerate("abc"):
            zoo[f"{arch}_{name}"] = tiny_model(root / f"{arch}_{name}", seed=10 * i + 1, arch=arch)
    return zoo


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Tests use their own cache, except the shared converted-SmolLM2 cache."""
    monkeypatch.setenv("CFM_TEST_TMP", str(tmp_path))
