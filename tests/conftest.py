from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import tiny_model  # noqa: E402

from cfmlang.io.weights import default_cache_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> dict[str, Path]:
    """Three tiny Llama and three tiny Mistral models of one shape each."""
    root = tmp_path_factory.mktemp("zoo")
    zoo = {}
    for arch in ("llama", "mistral"):
        for i, name in enumerate("abc"):
            zoo[f"{arch}_{name}"] = tiny_model(root / f"{arch}_{name}", seed=10 * i + 1, arch=arch)
    return zoo


SHARED_GGUF = default_cache_dir() / "gguf"
"""GGUF conversions (SmolLM2: ~20 s) are shared by every test and every run."""


def private_cache(root: Path) -> Path:
    """A cache root of its own whose `gguf/` is the shared conversions folder."""
    root.mkdir(parents=True, exist_ok=True)
    SHARED_GGUF.mkdir(parents=True, exist_ok=True)
    (root / "gguf").symlink_to(SHARED_GGUF, target_is_directory=True)
    return root


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Module- and session-scoped fixtures build into a cache of the test session."""
    saved = os.environ.get("CFM_CACHE_DIR")
    os.environ["CFM_CACHE_DIR"] = str(private_cache(tmp_path_factory.mktemp("session") / "cache"))
    yield
    if saved is None:
        os.environ.pop("CFM_CACHE_DIR")
    else:
        os.environ["CFM_CACHE_DIR"] = saved


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, tmp_path_factory, monkeypatch, session_cache):
    """Each test has a node cache of its own (so nothing it counts was done by another)
    and shares the converted SmolLM2."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CFM_TEST_TMP", str(tmp_path))
    monkeypatch.setenv("CFM_CACHE_DIR", str(private_cache(cache / "root")))
    yield
    shutil.rmtree(cache, ignore_errors=True)  # up to 1.4 GB of SmolLM2 nodes per test
