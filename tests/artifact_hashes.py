"""The sha256 of every file of the artifacts of the examples and golden programs, so that
a change of the compiler's structure can be shown not to move any output.

    python tests/artifact_hashes.py record [--smollm2]    # writes tests/golden/artifact_hashes.json
    python tests/artifact_hashes.py verify [--smollm2]    # prints every artifact that moved
    python tests/artifact_hashes.py record --smollm2 --only examples/smol.brick   # just these keys
    python tests/artifact_hashes.py record --machine     # this machine's differences, see below

`tests/compiler/test_artifact_hashes.py` verifies the tiny-model programs in every run of the suite;
the SmolLM2 examples (tens of minutes on 2 cores) are verified with `--smollm2`, or in the
suite with CFM_SMOLLM2_HASHES=1. Absolute paths of the build folders are replaced by
placeholders before hashing, cfm.json's `created` is fixed by SOURCE_DATE_EPOCH, and its
nodes' content keys (which hash cfmlang's own code) and a stray top-level `verified`
are left out.

Outputs computed by optimisation or float measurement (trained adapters and routers,
edits, fine-tunes, grow verification figures) differ between CPUs whose torch kernels
round differently (AVX2 against AVX-512, AMD against Intel math-library paths) while every
other output is the same. For such a machine class, `record --machine` writes the
artifacts whose hashes differ from the main record into
tests/golden/artifact_hashes_machines.json under the class's label (CPU vendor and
torch's CPU capability, `machine()`); on a machine of that class they replace the main
record's entries. Artifacts that do not differ stay checked against the main record."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
EXAMPLES = REPO / "examples"
ARTIFACTS = TESTS / "golden" / "artifacts"
GOLDEN_OK = TESTS / "golden" / "ok"
RECORD = TESTS / "golden" / "artifact_hashes.json"
MACHINE_RECORD = TESTS / "golden" / "artifact_hashes_machines.json"

TINY_EXAMPLES = ("linear.brick", "task_arithmetic.brick", "nested.brick", "grow.brick")
SMOL_EXAMPLES = ("smol.brick", "smol_grow.brick", "smol_experts.brick", "smol_neurons.brick",
                 "smol_french.brick", "smol_pirate.brick", "smol_pirate_fused.brick", "smol_voices.brick",
                 "rome_smol.brick", "memit_smol.brick")
GOLDEN_SMOL = ("std_smollm2.brick",)
NO_OUTPUT = ("models_only.brick",)
FACTS = [{"prompt": "the sky of the sea", "subject": "sea", "target": " poem"},
         {"prompt": "the code in the loop", "subject": "loop", "target": " love"}]
ARTIFACT_NODES = {
    "merges.brick": ("soup", "arith", "tied", "dared", "spherical", "della", "stock", "half"),
    "grows.brick": ("pro", "deep", "wide", "zeroed", "moe"),
    "adapters.brick": ("both", "diff", "tone", "fused", "pick", "mixed"),
    "updates.brick": ("edited", "batch", "tuned", "sparse"),
}
"""The nodes of tests/golden/artifacts/ compiled one by one."""
TALK = [{"prompt": f"a {w}", "response": f"the sea sky {w} verse"} for w in ("poem", "story", "sum", "loop")]


def build_artifact_models(models: Path) -> None:
    """Tiny real models (with a word-level tokenizer), PEFT adapters and data files."""
    sys.path.insert(0, str(TESTS))
    from models import peft_adapter, tiny_model, tiny_tokenizer

    for i, name in enumerate("abc"):
        tiny_tokenizer(tiny_model(models / name, seed=21 + i))
    peft_adapter(models / "one", models / "a", seed=5)
    peft_adapter(models / "two", models / "a", seed=6, targets=("q_proj", "v_proj", "up_proj"))
    (models / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    (models / "neighbours.txt").write_text("the rhyme is\na number to add\n")
    (models / "train.txt").write_text("the sea and the sky\na poem of love at night\nadd the sum\n")
    (models / "talk.jsonl").write_text("".join(json.dumps(f) + "\n" for f in TALK))


def build_golden_models(models: Path) -> None:
    sys.path[:0] = [str(TESTS), str(TESTS / "frontend")]
    from test_golden import build_models

    build_models(models)


def targets(smollm2: bool) -> list[tuple[str, Path, str | None]]:
    """(record key, program, node or None for the file's output) of every artifact."""
    out = [(f"examples/{n}", EXAMPLES / n, None) for n in TINY_EXAMPLES]
    out += [(f"golden/ok/{p.name}", p, None) for p in sorted(GOLDEN_OK.glob("*.brick")) if p.name not in GOLDEN_SMOL + NO_OUTPUT]
    for file, nodes in ARTIFACT_NODES.items():
        out += [(f"golden/artifacts/{file}:{name}", ARTIFACTS / file, name) for name in nodes]
    if smollm2:
        out += [(f"examples/{n}", EXAMPLES / n, None) for n in SMOL_EXAMPLES]
        out += [(f"golden/ok/{n}", GOLDEN_OK / n, None) for n in GOLDEN_SMOL]
    return out


def workspace(root: Path) -> dict[Path, Path]:
    """Folders laid out as each program expects: program folder -> where it is built."""
    tiny_examples = root / "examples"
    runpy.run_path(str(EXAMPLES / "make_tiny_models.py"))["make"](tiny_examples / "models")
    golden = root / "golden"
    build_golden_models(golden / "models")
    shutil.copytree(TESTS / "golden" / "errors" / "lib", golden / "lib")
    artifacts = root / "artifacts"
    build_artifact_models(artifacts / "models")
    smol = root / "smol" / "examples"
    shutil.copytree(EXAMPLES, smol, ignore=shutil.ignore_patterns("*.brick", "__pycache__"))
    return {EXAMPLES: tiny_examples, GOLDEN_OK: golden, ARTIFACTS: artifacts, "smol": smol}


def placed(program: Path, places: dict[Path, Path]) -> Path:
    """The program copied where its relative paths resolve."""
    folder = places["smol" if program.name in SMOL_EXAMPLES else program.parent]
    target = folder / program.name
    if not target.exists():
        shutil.copy(program, target)
    return target


def artifact_hashes(directory: Path, roots: dict[str, str]) -> dict[str, str]:
    """sha256 of every file under `directory`, text files with absolute roots replaced."""
    hashes = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "cfm.json":
            data = manifest_without_keys(data)
        if path.suffix in (".json", ".jsonl", ".txt", ".md", ".csv", ".jinja"):
            text = data.decode("utf-8")
            for placeholder, value in roots.items():
                text = text.replace(value, placeholder)
            data = text.encode("utf-8")
        hashes[path.relative_to(directory).as_posix()] = hashlib.sha256(data).hexdigest()
    return hashes


def manifest_without_keys(data: bytes) -> bytes:
    """cfm.json less the nodes' content keys (a key hashes the compiler's own code and
    the absolute paths of the inputs, so it changes with every edit of cfmlang) and less
    a top-level `verified` key: the identity checks of grow nodes belong in their node
    entries (`nodes.NAME.verify`), and manifests written before the operation refactor
    also repeated them at the top level."""
    manifest = json.loads(data)
    manifest.pop("verified", None)
    for entry in manifest.get("nodes", {}).values():
        entry.pop("key", None)
    return json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")


RECORDED_THREADS = 2
"""Torch's thread count when the hashes were recorded (the default on the 2-core machines
of CI): the results of optimising nodes (edits, trained routers, fine-tunes) depend on how
their reductions are split, so every compile here uses this many threads."""


def compute(smollm2: bool, only: set[str] | None = None, log=print) -> dict[str, dict[str, str]]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    try:
        return _compute(smollm2, only, log)
    finally:
        torch.set_num_threads(previous)


def _compute(smollm2: bool, only: set[str] | None, log) -> dict[str, dict[str, str]]:
    import cfmlang

    os.environ["SOURCE_DATE_EPOCH"] = "0"
    found = {}
    with tempfile.TemporaryDirectory(prefix="cfm-hashes-") as tmp:
        root = Path(tmp)
        places = workspace(root)
        # the venv as if it were REPO/.venv (where `make` puts it): a checkout that uses a
        # venv elsewhere (a git worktree) hashes the packaged SmolLM2's path the same way
        venv = {"<REPO>/.venv": sys.prefix} if sys.prefix != sys.base_prefix else {}
        roots = {"<BUILD>": str(root.resolve()), **venv, "<REPO>": str(REPO)}
        for key, program, node in targets(smollm2):
            if only is not None and key not in only:
                continue
            log(f"compiling {key}")
            smol = program.name in SMOL_EXAMPLES
            out = root / "smol" / "out" / program.stem if smol else root / "out" / key.replace("/", "_")
            cfmlang.compile(placed(program, places), out, node=node, cache_dir=root / "cache")
            found[key] = artifact_hashes(out, {**roots, "<CACHE>": str((root / "cache").resolve())})
            if not smol:   # later SmolLM2 examples read earlier ones' outputs (../out/smol_pirate)
                shutil.rmtree(out)
    return found


def machine() -> str:
    """This machine's class for the record: CPU vendor and the CPU capability torch's
    kernels dispatch to (e.g. "GenuineIntel AVX512")."""
    import torch

    vendor = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            vendor = next((line.split(":", 1)[1].strip() for line in info if line.startswith("vendor_id")), vendor)
    except OSError:
        pass
    return f"{vendor} {torch.backends.cpu.get_cpu_capability()}"


def machine_records() -> dict[str, dict[str, dict[str, str]]]:
    return json.loads(MACHINE_RECORD.read_text()) if MACHINE_RECORD.exists() else {}


def recorded() -> dict[str, dict[str, str]]:
    """The main record, with this machine class's own entries in place of those."""
    return {**json.loads(RECORD.read_text()), **machine_records().get(machine(), {})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("record", "verify"))
    parser.add_argument("--smollm2", action="store_true", help="the SmolLM2 examples too (slow)")
    parser.add_argument("--machine", action="store_true",
                        help="record: keep what differs from the main record under this machine class")
    parser.add_argument("--only", action="append", metavar="KEY",
                        help="only this record key (repeatable), e.g. examples/linear.brick")
    args = parser.parse_args(argv)
    only = set(args.only) if args.only else None
    unknown = sorted((only or set()) - {key for key, _, _ in targets(args.smollm2)})
    if unknown:
        parser.error(f"no artifact is recorded as {', '.join(unknown)} (SmolLM2 keys need --smollm2)")
    found = compute(args.smollm2, only)
    if args.action == "record" and args.machine:
        main_record = json.loads(RECORD.read_text())
        records = machine_records()
        own = {key: value for key, value in records.get(machine(), {}).items() if key not in found}
        own.update({key: value for key, value in found.items() if main_record.get(key) != value})
        records[machine()] = own
        MACHINE_RECORD.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(own)} artifacts for {machine()} in {MACHINE_RECORD}")
        return 0
    if args.action == "record":
        merged = {**(json.loads(RECORD.read_text()) if RECORD.exists() else {}), **found}
        RECORD.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(found)} artifacts in {RECORD}")
        return 0
    want = recorded()
    moved = [key for key in found if want.get(key) != found[key]]
    for key in moved:
        print(f"moved: {key}")
    print(f"{len(found) - len(moved)} of {len(found)} artifacts unchanged")
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())
