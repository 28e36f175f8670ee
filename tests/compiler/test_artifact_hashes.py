"""Outputs do not move: every artifact of the tiny-model examples and golden programs
(each node of tests/golden/artifacts/ compiled on its own) hashes to what was recorded in
tests/golden/artifact_hashes.json. The SmolLM2 examples are compared too when
CFM_SMOLLM2_HASHES=1 (tens of minutes; `python tests/artifact_hashes.py verify --smollm2`
does the same outside pytest)."""
from __future__ import annotations

import os

import pytest

import artifact_hashes

SMOLLM2 = os.environ.get("CFM_SMOLLM2_HASHES") == "1"


@pytest.fixture(scope="module")
def built():
    return artifact_hashes.compute(SMOLLM2, log=lambda message: None)


def test_every_recorded_artifact_is_built(built):
    recorded = artifact_hashes.recorded()
    wanted = {key for key, _, _ in artifact_hashes.targets(SMOLLM2)}
    assert wanted <= recorded.keys(), f"not recorded: {sorted(wanted - recorded.keys())}"
    assert built.keys() == wanted


@pytest.mark.parametrize("key", [key for key, _, _ in artifact_hashes.targets(SMOLLM2)])
def test_artifact_files_hash_as_recorded(built, key):
    recorded = artifact_hashes.recorded()[key]
    moved = {name for name in recorded.keys() | built[key].keys() if recorded.get(name) != built[key].get(name)}
    assert not moved, f"{key}: files that changed: {sorted(moved)}"
