"""The catalogue of bad inputs (docs/bad-inputs.md), run row by row.

Each row of the catalogue names a case, the diagnostic code it must get and a piece of
its message. The builders below make each input for real (damaged files, links, a
file-size limit); the harness runs `cfmc` on it and checks: exit 1, that code and text,
no traceback, and nothing written (no output, no temporary sibling, a previous
artifact untouched). The catalogue and the builders must name the same cases.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import resource
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cfmlang.cli import main
from models import peft_adapter, tiny_model
from paths import REPO

CATALOGUE = REPO / "docs" / "bad-inputs.md"
ROW = re.compile(r"^\| `([a-z0-9-]+)` \| (.+?) \| (E\d{3}) \| (.+?) \|$")


def catalogue_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in CATALOGUE.read_text().splitlines():
        match = ROW.match(line)
        if match:
            case, _, code, text = match.groups()
            assert case not in rows, f"{case} is catalogued twice"
            rows[case] = (code, text.replace("\\|", "|").strip("`"))
    return rows


# ---------------------------------------------------------------- damaged models

def header_of(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


LAYER_COUNTS = {"huge": 10**9, "negative": -2, "zero": 0, "boolean": True, "string": "2", "fraction": 2.7,
                "too-many": 3}


class Evil:
    """Unpickling this would run a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-models")
    a = tiny_model(root / "a", seed=1)
    tiny_model(root / "b", seed=2)
    tensors = load_file(a / "model.safetensors")
    raw = (a / "model.safetensors").read_bytes()
    header, data = header_of(raw)
    norm = "model.norm.weight"

    def model(name: str, weights: bytes | dict | None = None, file: str = "model.safetensors") -> Path:
        folder = root / name
        folder.mkdir()
        shutil.copy(a / "config.json", folder)
        if isinstance(weights, dict):
            save_file(weights, folder / file, metadata={"format": "pt"})
        elif weights is not None:
            (folder / file).write_bytes(weights)
        return folder

    model("truncated", raw[: len(raw) // 2])
    model("empty", b"")
    model("header-length", b"\xff" * 8 + b"{}")
    model("header-not-json", struct.pack("<Q", 6) + b"{nope}")
    model("header-not-object", struct.pack("<Q", 2) + b"[]")
    model("negative-shape", with_header({**header, norm: {**header[norm], "shape": [-32]}}, data))
    model("unknown-dtype", with_header({**header, norm: {**header[norm], "dtype": "X9"}}, data))
    start, end = header[norm]["data_offsets"]
    model("byte-count", with_header({**header, norm: {**header[norm], "data_offsets": [start, end - 4]}}, data))
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    shifted = [offset - 4 for offset in header[last]["data_offsets"]]
    model("overlapping-offsets", with_header({**header, last: {**header[last], "data_offsets": shifted}}, data))
    text = json.dumps(header)
    twice = (text[:-1] + f', "{norm}": ' + json.dumps(header[norm]) + "}").encode()
    model("duplicate-key", struct.pack("<Q", len(twice)) + twice + data)
    model("metadata-not-strings", with_header({**header, "__metadata__": {"format": 1}}, data))
    deep = b"[" * 100_000 + b"]" * 100_000
    model("header-deep", struct.pack("<Q", len(deep)) + deep + data)
    spot = header["lm_head.weight"]["data_offsets"][0]
    model("nan-bytes", with_header(header, data[:spot] + b"\xff" * 64 + data[spot + 64:]))
    model("int-tensor", {**tensors, norm: tensors[norm].to(torch.int64)})
    model("f8-tensor", {**tensors, norm: tensors[norm].to(torch.float8_e4m3fn)})
    lost = model("missing-shard", {k: v for k, v in tensors.items() if k != norm},
                 "model-00001-of-00002.safetensors")
    (lost / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in tensors}, norm: "model-00002-of-00002.safetensors"}}))
    model("bad-index", tensors, "model-00001-of-00001.safetensors")
    (root / "bad-index" / "model.safetensors.index.json").write_text("{not json")
    for name, index in (("index-dotdot", {"weight_map": {norm: "../outside.safetensors"}}),
                        ("index-list", {"weight_map": ["model-00001-of-00001.safetensors"]}),
                        ("index-int", {"weight_map": 5}), ("index-null", {"weight_map": None}),
                        ("index-empty", {"weight_map": {}}),
                        ("index-deep", "[" * 100_000 + "]" * 100_000)):
        model(name, tensors, "model-00001-of-00001.safetensors")
        (root / name / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    shutil.copy(a / "model.safetensors", root / "outside.safetensors")
    shutil.copy(a / "model.safetensors", model("config-deep", None))
    (root / "config-deep" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    twice = model("duplicate-tensor", tensors, "model-00001-of-00002.safetensors")
    save_file({norm: tensors[norm]}, twice / "model-00002-of-00002.safetensors")
    (twice / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in tensors}, norm: "model-00002-of-00002.safetensors"}}))
    shutil.copy(a / "model.safetensors", model("no-config", None))
    (root / "no-config" / "config.json").unlink()
    shutil.copy(a / "model.safetensors", model("config-not-json", None))
    (root / "config-not-json" / "config.json").write_text("{nope")
    shutil.copy(a / "model.safetensors", model("config-not-object", None))
    (root / "config-not-object" / "config.json").write_text("[1, 2]")
    shutil.copy(a / "model.safetensors", model("config-lacks-keys", None))
    (root / "config-lacks-keys" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    model("no-weights", None)
    base_config = json.loads((a / "config.json").read_text())
    for name, layers in LAYER_COUNTS.items():
        shutil.copy(a / "model.safetensors", model(f"layers-{name}", None))
        (root / f"layers-{name}" / "config.json").write_text(json.dumps({**base_config, "num_hidden_layers": layers}))
    (model("weights-directory", None) / "model.safetensors").mkdir()
    shutil.copy(a / "model.safetensors", model("weights-unreadable", None))
    (root / "weights-unreadable" / "model.safetensors").chmod(0)
    os.mkfifo(model("weights-fifo", None) / "model.safetensors")
    shutil.copy(a / "model.safetensors", model("config-infinite", None))
    infinite = (a / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e999')
    assert "1e999" in infinite
    (root / "config-infinite" / "config.json").write_text(infinite)
    torch.save(tensors, model("pickle-only", None) / "pytorch_model.bin")
    (model("pickle-evil", None) / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(root / "pwned"), protocol=2))
    (model("pickle-garbage", None) / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    torch.save([tensors[norm]], model("pickle-list", None) / "pytorch_model.bin")
    tiny_model(root / "wide", seed=3, hidden_size=64)
    reshaped = dict(tensors)
    reshaped["model.layers.0.mlp.gate_proj.weight"] = reshaped["model.layers.0.mlp.gate_proj.weight"].t().contiguous()
    model("transposed", reshaped)
    model("missing-tensor", {k: v for k, v in tensors.items() if k != norm})
    (root / "fake.gguf").write_text("not a GGUF file")
    exported_program(root / "program.pt2")
    lora = peft_adapter(root / "lora", a, seed=5)
    shutil.copytree(lora, root / "lora-alpha-nan")
    config = json.loads((lora / "adapter_config.json").read_text())
    (root / "lora-alpha-nan" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": float("nan")}))
    shutil.copytree(lora, root / "lora-config-deep")
    (root / "lora-config-deep" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    shutil.copytree(lora, root / "lora-b-nan")
    factors = load_file(lora / "adapter_model.safetensors")
    some_b = next(name for name in sorted(factors) if "lora_B" in name)
    factors[some_b][0, 0] = float("nan")
    save_file(factors, root / "lora-b-nan" / "adapter_model.safetensors")
    return root


# ---------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    argv: list[str]
    output: Path | None = None       # must not appear (or stay as it was, if it existed)
    limit_file_size: int | None = None
    env: tuple[tuple[str, str], ...] = ()
    without_file_privileges: bool = False   # run where permission bits hold, even as root


MERGE = """model a:
  source: hf "{a}"
model b:
  source: hf "{b}"{pickle}
merge mix:
  method: linear
  inputs:
    a: {{weight: 0.5}}
    b: {{weight: {weight}}}
output: mix
"""


FUSED = """model a:
  source: hf "{a}"
brick fr:
  kind: lora
  source: peft "{lora}"
  base: a
model fused:
  from: a
  attach: [fr]
output: fused
"""


def fused_case(tmp: Path, models: Path, lora: str) -> Case:
    program = tmp / "fused.brick"
    program.write_text(FUSED.format(a=models / "a", lora=models / lora))
    return Case(["compile", str(program), "-o", str(tmp / "out"), "-q"], tmp / "out")


def compile_case(tmp: Path, models: Path, b: str, weight="0.5", pickle_ok=False, a: str = "a") -> Case:
    program = tmp / "mix.brick"
    program.write_text(MERGE.format(a=models / a, b=models / b, weight=weight,
                                    pickle="\n  allow_pickle: true" if pickle_ok else ""))
    return Case(["compile", str(program), "-o", str(tmp / "out"), "-q"], tmp / "out")


def model_source(tmp: Path, models: Path, b: str, pickle_ok=False) -> Case:
    return compile_case(tmp, models, b, pickle_ok=pickle_ok)


def text_case(tmp: Path, content: bytes | str, name: str = "f.brick") -> Case:
    path = tmp / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return Case(["check", str(path)])


def import_case(tmp: Path, line: str) -> Case:
    project = tmp / "project"
    project.mkdir()
    (tmp / "outside.brick").write_text('model x:\n  source: hf "nowhere"\n')
    (project / "linked").symlink_to(tmp / "outside.brick")
    (project / "main.brick").write_text(line + "\n")
    return Case(["check", str(project / "main.brick")])


def import_chain(tmp: Path, models: Path) -> Case:
    """f0.brick imports f1.brick, which imports f2.brick ... f1999.brick."""
    for index in range(2000):
        (tmp / f"f{index}.brick").write_text(f'import "f{index + 1}.brick"\n' if index < 1999 else
                                              f'model a:\n  source: hf "{models / "a"}"\n')
    return Case(["check", str(tmp / "f0.brick")])


def symlinked_output(tmp: Path, models: Path) -> Case:
    case = compile_case(tmp, models, "b")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (tmp / "out").symlink_to(elsewhere, target_is_directory=True)
    return case


def full_disk(tmp: Path, models: Path) -> Case:
    case = compile_case(tmp, models, "b")
    return Case(case.argv, case.output, limit_file_size=20_000)


def foreign_output(tmp: Path, models: Path, as_file: bool) -> Case:
    case = compile_case(tmp, models, "b")
    if as_file:
        case.output.write_text("precious")
    else:
        case.output.mkdir()
        (case.output / "notes.txt").write_text("precious")
    return case


def shadowing_package(tmp: Path, models: Path) -> Case:
    """A folder named like a package, on the path, with a .gguf in it: not installed."""
    (tmp / "llm_fake_pkg").mkdir()
    (tmp / "llm_fake_pkg" / "__init__.py").write_text("")
    shutil.copy(models / "fake.gguf", tmp / "llm_fake_pkg" / "model.gguf")
    sys.path.insert(0, str(tmp))
    return text_case(tmp, 'model a:\n  source: pkg "llm_fake_pkg"\noutput: a\n')


# ---------------------------------------------------------------- hostile artifacts

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


def exported_program(path: Path) -> Path:
    torch.export.save(torch.export.export(Tiny(), (torch.randn(1, 3),)), path)
    return path


def rewritten_archive(source: Path, target: Path, change, extra: dict[str, bytes] | None = None) -> Path:
    """A copy of the zip archive `source` with each member's bytes passed through
    `change(name, data)`, plus `extra` members (named inside the archive's root)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        root = old.namelist()[0].split("/")[0]
        for name in old.namelist():
            new.writestr(name, change(name, old.read(name)))
        for name, data in (extra or {}).items():
            new.writestr(f"{root}/{name}", data)
    return target


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(Evil(marker), protocol=2)


def pickled_weight(marker: Path):
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            config["config"]["lin.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        return evil_pickle(marker) if name.endswith("data/weights/weight_0") else data
    return change


def pickled_sample_inputs(marker: Path):
    return lambda name, data: evil_pickle(marker) if name.endswith("data/sample_inputs/model.pt") else data


def opaque_constant(marker: Path):
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("model_constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                                "use_pickle": True, "tensor_meta": None}}}).encode()
        return data
    return change


def artifact(tmp: Path, models: Path, manifest: dict | str, program: Path | None = None,
             files: dict[str, bytes] | None = None) -> Path:
    """A small artifact: the tiny model `a`, `manifest` as its cfm.json, `program` copied
    to lowered/model.pt2, and `files` written inside it."""
    folder = tmp / "artifact"
    shutil.copytree(models / "a", folder)
    (folder / "cfm.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    (folder / "lowered").mkdir()
    if program is not None:
        shutil.copy(program, folder / "lowered" / "model.pt2")
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    return folder


def lowered(program: str = "lowered/model.pt2", **changes) -> dict:
    return {"kind": "model", "lowered": {"target": "export", "dtype": "float32", "device": "cpu",
                                         "files": {"program": program}, **changes}}


def run_artifact(tmp: Path, models: Path, manifest: dict | str, program: Path | None = None,
                 files: dict[str, bytes] | None = None) -> Case:
    return Case(["run", str(artifact(tmp, models, manifest, program, files)), "--prompt", "hi"])


def hostile_program(tmp: Path, models: Path, change, extra: dict[str, bytes] | None = None) -> Case:
    evil = rewritten_archive(models / "program.pt2", tmp / "evil.pt2", change(models / "pwned"), extra)
    return run_artifact(tmp, models, lowered(), evil)


def program_outside(tmp: Path, models: Path, how: str) -> Case:
    evil = rewritten_archive(models / "program.pt2", tmp / "evil.pt2", pickled_weight(models / "pwned"))
    if how == "link":
        case = run_artifact(tmp, models, lowered())
        (tmp / "artifact" / "lowered" / "model.pt2").symlink_to(evil)
        return case
    return run_artifact(tmp, models, lowered(str(evil) if how == "absolute" else "../evil.pt2"))


def adapter_with_hub_base(tmp: Path, models: Path) -> Case:
    config = json.dumps({"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M", "peft_type": "LORA"})
    return run_artifact(tmp, models, {"kind": "adapter"}, files={"adapter_config.json": config.encode()})


# ---------------------------------------------------------------- the cache and the command line

def cache_case(tmp: Path, models: Path, where: str) -> Case:
    case = compile_case(tmp, models, "b")
    case.output.mkdir()
    (case.output / "cfm.json").write_text("{}")             # a previous artifact
    if where == "inside":
        return Case([*case.argv, "--cache-dir", str(case.output / "cache")], case.output)
    (tmp / "cache-file").write_text("not a folder")
    return Case([*case.argv, "--cache-dir", str(tmp / "cache-file")], case.output)


def with_arguments(case: Case, *extra: str, env: tuple[tuple[str, str], ...] = ()) -> Case:
    return Case([*case.argv, *extra], case.output, env=env)


def deep_training_data(tmp: Path, models: Path) -> Case:
    (tmp / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    return text_case(tmp, f'model a:\n  source: hf "{models / "a"}"\nbrick t:\n  kind: lora\n  base: a\n'
                          '  train: {data: "deep.jsonl", steps: 1}\n')


DATA_STATEMENTS = {
    "facts": 'update e:\n  method: rome\n  from: a\n  facts: "data.txt"\n',
    "finetune": 'update t:\n  method: finetune\n  from: a\n  train: [a.layers[0]]\n  data: "data.txt"\n',
    "lora": 'brick t:\n  kind: lora\n  base: a\n  train: {data: "data.txt", steps: 1}\n',
}


def data_file_case(tmp: Path, models: Path, statement: str, kind: str) -> Case:
    """A statement whose data file is a FIFO nobody writes to (reading it would block) or a
    link to /dev/zero (endless)."""
    data = tmp / "data.txt"
    if kind == "fifo":
        os.mkfifo(data)
    else:
        data.symlink_to("/dev/zero")
    return text_case(tmp, f'model a:\n  source: hf "{models / "a"}"\n' + DATA_STATEMENTS[statement])


DEEP_BLOCKS = "model a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 80)) + " " * 80 + "x: 1\n"

CASES = {
    "truncated-safetensors": lambda t, m: model_source(t, m, "truncated"),
    "empty-safetensors": lambda t, m: model_source(t, m, "empty"),
    "header-length-garbage": lambda t, m: model_source(t, m, "header-length"),
    "header-not-json": lambda t, m: model_source(t, m, "header-not-json"),
    "header-not-object": lambda t, m: model_source(t, m, "header-not-object"),
    "negative-shape": lambda t, m: model_source(t, m, "negative-shape"),
    "unknown-dtype": lambda t, m: model_source(t, m, "unknown-dtype"),
    "byte-count-mismatch": lambda t, m: model_source(t, m, "byte-count"),
    "overlapping-offsets": lambda t, m: model_source(t, m, "overlapping-offsets"),
    "duplicate-header-key": lambda t, m: model_source(t, m, "duplicate-key"),
    "metadata-not-strings": lambda t, m: model_source(t, m, "metadata-not-strings"),
    "header-nested-deep": lambda t, m: model_source(t, m, "header-deep"),
    "index-shard-outside": lambda t, m: model_source(t, m, "index-dotdot"),
    "index-weight-map-list": lambda t, m: model_source(t, m, "index-list"),
    "index-weight-map-int": lambda t, m: model_source(t, m, "index-int"),
    "index-weight-map-null": lambda t, m: model_source(t, m, "index-null"),
    "index-weight-map-empty": lambda t, m: model_source(t, m, "index-empty"),
    "index-nested-deep": lambda t, m: model_source(t, m, "index-deep"),
    "config-nested-deep": lambda t, m: model_source(t, m, "config-deep"),
    "nan-in-weights": lambda t, m: model_source(t, m, "nan-bytes"),
    "integer-tensor": lambda t, m: model_source(t, m, "int-tensor"),
    "float8-tensor": lambda t, m: model_source(t, m, "f8-tensor"),
    "missing-shard": lambda t, m: model_source(t, m, "missing-shard"),
    "index-not-json": lambda t, m: model_source(t, m, "bad-index"),
    "tensor-in-two-shards": lambda t, m: model_source(t, m, "duplicate-tensor"),
    "no-config": lambda t, m: model_source(t, m, "no-config"),
    "config-not-json": lambda t, m: model_source(t, m, "config-not-json"),
    "config-not-object": lambda t, m: model_source(t, m, "config-not-object"),
    "config-lacks-keys": lambda t, m: model_source(t, m, "config-lacks-keys"),
    "no-weights": lambda t, m: model_source(t, m, "no-weights"),
    **{f"config-layers-{name}": (lambda name: lambda t, m: model_source(t, m, f"layers-{name}"))(name)
       for name in LAYER_COUNTS},
    "weights-a-directory": lambda t, m: model_source(t, m, "weights-directory"),
    "weights-unreadable": lambda t, m: replace(model_source(t, m, "weights-unreadable"), without_file_privileges=True),
    "config-infinite-number": lambda t, m: model_source(t, m, "config-infinite"),
    "source-path-too-long": lambda t, m: model_source(t, m, "x" * 300),
    "output-path-too-long": lambda t, m: Case([*compile_case(t, m, "b").argv[:3], str(t / ("y" * 300)), "-q"]),
    "pickle-not-allowed": lambda t, m: model_source(t, m, "pickle-only"),
    "pickle-with-code": lambda t, m: model_source(t, m, "pickle-evil", pickle_ok=True),
    "pickle-garbage": lambda t, m: model_source(t, m, "pickle-garbage", pickle_ok=True),
    "pickle-not-a-state-dict": lambda t, m: model_source(t, m, "pickle-list", pickle_ok=True),
    "fake-gguf": lambda t, m: text_case(t, f'model a:\n  source: gguf "{m / "fake.gguf"}"\noutput: a\n'),
    "missing-source": lambda t, m: model_source(t, m, "no-such-model"),
    "package-not-installed": shadowing_package,
    "architecture-mismatch": lambda t, m: model_source(t, m, "wide"),
    "tensor-shape-mismatch": lambda t, m: model_source(t, m, "transposed"),
    "tensor-missing": lambda t, m: model_source(t, m, "missing-tensor"),
    "nan-producing-merge": lambda t, m: compile_case(t, m, "b", weight="-0.5"),
    "infinite-number": lambda t, m: compile_case(t, m, "b", weight="1e999"),
    "huge-integer": lambda t, m: compile_case(t, m, "b", weight="9" * 400),
    "integer-over-4300-digits": lambda t, m: compile_case(t, m, "b", weight="9" * 5000),
    "index-over-4300-digits": lambda t, m: text_case(t, f'model a:\n  source: hf "{m / "a"}"\n'
                                                        f'model b:\n  from: a.layers[{"9" * 5000}]\n'),
    "import-chain-2000-files": import_chain,
    "nul-escape": lambda t, m: text_case(t, 'model a:\n  source: hf "a\\u0000b"\n'),
    "lone-surrogate": lambda t, m: text_case(t, 'model a:\n  source: hf "\\ud800"\n'),
    "not-utf8": lambda t, m: text_case(t, b'model a:\n  source: hf "\xff\xfe"\n'),
    "nul-byte": lambda t, m: text_case(t, b'model a:\n  source: hf "a\x00"\n'),
    "deep-brackets": lambda t, m: text_case(t, "output: " + "[" * 200 + "]" * 200 + "\n"),
    "deep-blocks": lambda t, m: text_case(t, DEEP_BLOCKS),
    "brick-file-missing": lambda t, m: Case(["check", str(t / "nope.brick")]),
    "brick-file-is-a-directory": lambda t, m: (t / "dir.brick").mkdir() or Case(["check", str(t / "dir.brick")]),
    "import-dotdot-escape": lambda t, m: import_case(t, 'import "../outside.brick"'),
    "import-symlink-escape": lambda t, m: import_case(t, 'import "linked"'),
    "import-std-escape": lambda t, m: import_case(t, 'import "std/../../../../../../etc/passwd"'),
    "output-is-a-symlink": symlinked_output,
    "output-is-a-file": lambda t, m: foreign_output(t, m, as_file=True),
    "output-is-a-foreign-directory": lambda t, m: foreign_output(t, m, as_file=False),
    "disk-full": full_disk,
    "artifact-pickled-weight": lambda t, m: hostile_program(t, m, pickled_weight),
    "artifact-pickled-sample-inputs": lambda t, m: hostile_program(t, m, pickled_sample_inputs),
    "artifact-opaque-constant": lambda t, m: hostile_program(
        t, m, opaque_constant, {"data/constants/opaque_obj_0": evil_pickle(m / "pwned")}),
    "artifact-legacy-pickled-weights": lambda t, m: hostile_program(
        t, m, lambda marker: lambda name, data: data, {"data/weights/model.pt": evil_pickle(m / "pwned")}),
    "artifact-duplicate-member": lambda t, m: hostile_program(
        t, m, lambda marker: lambda name, data: data,
        {"data/weights/model_weights_config.json": json.dumps({"config": {}}).encode()}),
    "artifact-program-not-an-archive": lambda t, m: run_artifact(
        t, m, lowered(), files={"lowered/model.pt2": b"not a zip archive"}),
    "artifact-program-absolute-path": lambda t, m: program_outside(t, m, "absolute"),
    "artifact-program-dotdot": lambda t, m: program_outside(t, m, "dotdot"),
    "artifact-program-symlink-out": lambda t, m: program_outside(t, m, "link"),
    "artifact-program-missing": lambda t, m: run_artifact(t, m, lowered("lowered/none.pt2")),
    "artifact-native-untrusted": lambda t, m: run_artifact(
        t, m, lowered(target="inductor"), files={"lowered/model.pt2": b"native code, perhaps"}),
    "artifact-manifest-not-json": lambda t, m: run_artifact(t, m, "{nope"),
    "artifact-manifest-not-object": lambda t, m: run_artifact(t, m, "[1]"),
    "artifact-manifest-deep": lambda t, m: run_artifact(t, m, "[" * 100_000 + "]" * 100_000),
    "artifact-lowered-not-object": lambda t, m: run_artifact(t, m, {"lowered": "lowered/model.pt2"}),
    "artifact-lowered-dtype-list": lambda t, m: run_artifact(t, m, lowered(dtype=["float32"]), m / "program.pt2"),
    "artifact-lowered-unknown-target": lambda t, m: run_artifact(t, m, lowered(target="pickle"), m / "program.pt2"),
    "artifact-lowered-bad-device": lambda t, m: run_artifact(t, m, lowered(device="nowhere"), m / "program.pt2"),
    "artifact-routing-not-object": lambda t, m: run_artifact(t, m, {"kind": "routed-topk", "routing": 5}),
    "artifact-adapter-hub-base": adapter_with_hub_base,
    "artifact-no-tokenizer": lambda t, m: run_artifact(t, m, {"kind": "model"}),
    "artifact-tokenizer-not-json": lambda t, m: run_artifact(t, m, {"kind": "model"},
                                                             files={"tokenizer.json": b'{"version": '}),
    "artifact-config-not-json": lambda t, m: run_artifact(t, m, {"kind": "model"}, files={"config.json": b"{nope"}),
    "artifact-config-unknown-model-type": lambda t, m: run_artifact(
        t, m, {"kind": "model"}, files={"config.json": b'{"model_type": "nonsense"}'}),
    "lora-alpha-nan": lambda t, m: fused_case(t, m, "lora-alpha-nan"),
    "lora-b-nan": lambda t, m: fused_case(t, m, "lora-b-nan"),
    "lora-config-nested-deep": lambda t, m: fused_case(t, m, "lora-config-deep"),
    "dtype-a-list": lambda t, m: text_case(t, MERGE.format(a=m / "a", b=m / "b", weight="0.5", pickle="")
                                           .replace("output: mix", "  dtype: [float32]\noutput: mix")),
    "dtype-a-map": lambda t, m: text_case(t, MERGE.format(a=m / "a", b=m / "b", weight="0.5", pickle="")
                                          .replace("output: mix", "  dtype: {a: 1}\noutput: mix")),
    "training-data-nested-deep": deep_training_data,
    "weights-a-fifo": lambda t, m: model_source(t, m, "weights-fifo"),
    "facts-file-fifo": lambda t, m: data_file_case(t, m, "facts", "fifo"),
    "facts-file-dev-zero": lambda t, m: data_file_case(t, m, "facts", "zero"),
    "finetune-data-fifo": lambda t, m: data_file_case(t, m, "finetune", "fifo"),
    "finetune-data-dev-zero": lambda t, m: data_file_case(t, m, "finetune", "zero"),
    "training-data-fifo": lambda t, m: data_file_case(t, m, "lora", "fifo"),
    "training-data-dev-zero": lambda t, m: data_file_case(t, m, "lora", "zero"),
    "cache-inside-output": lambda t, m: cache_case(t, m, "inside"),
    "cache-dir-is-a-file": lambda t, m: cache_case(t, m, "file"),
    "cache-size-infinite": lambda t, m: with_arguments(compile_case(t, m, "b"), env=(("CFM_CACHE_SIZE", "1e400"),)),
    "shard-size-infinite": lambda t, m: with_arguments(compile_case(t, m, "b"), "--shard-size", "inf"),
    "missing-output-option": lambda t, m: Case(compile_case(t, m, "b").argv[:2]),
}


def test_catalogue_and_cases_name_the_same_inputs():
    rows = catalogue_rows()
    assert len(rows) >= 40
    assert set(rows) == set(CASES), (f"catalogued without a case: {sorted(set(rows) - set(CASES))}; "
                                     f"cases missing from the catalogue: {sorted(set(CASES) - set(rows))}")


ELSEWHERE = re.compile(r"^\| `([a-z0-9-]+)` \| (.+?) \| `(tests/[a-z0-9_/]+\.py)::(test_[a-z0-9_]+)` \|$")


def test_every_case_tried_elsewhere_names_a_test_that_exists():
    """The catalogue's cases that other tests try (races, changing inputs, scaling,
    fuzzing): each row's test function is defined in the file it names."""
    import ast

    rows = [ELSEWHERE.match(line).groups() for line in CATALOGUE.read_text().splitlines() if ELSEWHERE.match(line)]
    assert len(rows) >= 15
    assert not set(case for case, *_ in rows) & set(catalogue_rows())
    for case, _, file, name in rows:
        tree = ast.parse((REPO / file).read_text())
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert name in defined, f"{case}: {file} has no {name}"


def snapshot(path: Path):
    if path.is_symlink():
        return ("link", os.readlink(path), snapshot(path.resolve()))
    if path.is_file():
        return ("file", path.read_bytes())
    if path.is_dir():
        return ("dir", {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()})
    return None


FSIZE_PREAMBLE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from cfmlang.cli import main
sys.exit(main(sys.argv[1:]))
"""


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def drop_file_privileges() -> None:
    """In the child before exec: without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH in its
    bounding set, a root process execs without them, so a file's permission bits hold for
    it (the suite runs as root in CI)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run(case: Case, capsys) -> tuple[int, str]:
    if case.limit_file_size is None and not case.without_file_privileges:
        code = main(case.argv)
        captured = capsys.readouterr()
        return code, captured.err + captured.out
    limit = case.limit_file_size if case.limit_file_size is not None else resource.RLIM_INFINITY
    preexec = drop_file_privileges if case.without_file_privileges and os.geteuid() == 0 else None
    proc = subprocess.run([sys.executable, "-c", FSIZE_PREAMBLE.format(limit=limit), *case.argv],
                          capture_output=True, text=True, preexec_fn=preexec)
    return proc.returncode, proc.stderr + proc.stdout


@pytest.mark.parametrize("name", sorted(catalogue_rows()))
def test_bad_input(name, models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    code, text = catalogue_rows()[name]
    case = CASES[name](tmp_path, models)
    before = snapshot(case.output) if case.output else None
    for variable, value in case.env:
        monkeypatch.setenv(variable, value)
    exit_code, output = run(case, capsys)
    assert exit_code == 1, output
    assert f"error[{code}]" in output, output
    assert text in output, output
    assert "Traceback" not in output and "internal error" not in output
    if case.output is not None:
        assert snapshot(case.output) == before
        leftovers = [p.name for p in case.output.parent.iterdir() if p.name.startswith(f".{case.output.name}.")]
        assert leftovers == []
    assert not (models / "pwned").exists(), "a pickle ran code"


HOSTILE_PROGRAMS = {
    "pickled-weight": (pickled_weight, {}),
    "pickled-sample-inputs": (pickled_sample_inputs, {}),
    "opaque-constant": (opaque_constant, {"data/constants/opaque_obj_0": None}),
    "legacy-pickled-weights": (lambda marker: lambda name, data: data, {"data/weights/model.pt": None}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_PROGRAMS))
def test_the_hostile_programs_run_code_when_torch_loads_them(name, models, tmp_path):
    """The artifact cases above are real attacks: `torch.export.load` on the same archive
    runs the command (so their marker check can fail)."""
    marker = tmp_path / "ran"
    change, extra = HOSTILE_PROGRAMS[name]
    evil = rewritten_archive(models / "program.pt2", tmp_path / "evil.pt2", change(marker),
                             {part: evil_pickle(marker) for part in extra})
    with contextlib.suppress(Exception):
        torch.export.load(evil)
    assert marker.exists()
