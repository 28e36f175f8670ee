"""The artifact's model card (README.md): Hugging Face metadata and the recipe.

The front matter lists what is known of the inputs: the Hugging Face ids they name
(`base_model`), their license (from an input's README front matter, its config or its
GGUF metadata), the operations used (`tags`). The body is the recipe: the .brick source,
each node's manifest entry (method, parameters, verification and edit reports), and the
content hash of every input file. It is a function of the manifest, the sources and the
inputs' files only (no clock, no content keys), so rebuilds stay byte-identical.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from cfmlang.compiler.ir import CheckedProgram, ModelNode
from cfmlang.compiler.keys import FileHash, source_contents
from cfmlang.io.gguf_header import gguf_header

CARD_NAME = "README.md"
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NODE_FIELDS_NOT_IN_CARD = ("key",)


@dataclass(frozen=True)
class InputFacts:
    """What the card says of one model input: where it is, what its files hash to, and
    the Hugging Face ids and license it declares."""

    node: str
    tag: str
    given: str
    files: tuple[tuple[str, str], ...]
    hf_ids: tuple[str, ...]
    license: str | None


def write_card(folder: Path, program: CheckedProgram, manifest: dict, file_hash: FileHash) -> None:
    inputs = [input_facts(node, file_hash) for node in program.nodes if isinstance(node, ModelNode)]
    sources = [(Path(path).name, _source_text(Path(path))) for path, _ in program.files]
    (folder / CARD_NAME).write_text(render_card(manifest, sources, inputs), encoding="utf-8")


def _source_text(path: Path) -> str:
    """A .brick file's text; a program given as text (`<input>`) is not kept anywhere."""
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return "# given to cfmlang.compile as text; see its sha256"


def input_facts(node: ModelNode, file_hash: FileHash) -> InputFacts:
    contents = source_contents(node.source, file_hash)
    path = Path(node.source.path)
    folder = path if path.is_dir() else path.parent
    declared = _front_matter(folder / CARD_NAME) if node.source.kind != "gguf" else {}
    config = _json(folder / "config.json") if node.source.kind != "gguf" else {}
    gguf_meta = _gguf_general(path) if node.source.kind == "gguf" else {}
    ids = [v for v in _as_list(declared.get("base_model")) + [config.get("_name_or_path")]
           if isinstance(v, str) and HF_ID.match(v) and not Path(v).exists()]
    license = declared.get("license") or config.get("license") or gguf_meta.get("general.license")
    return InputFacts(node.name, node.source.tag, node.source.given,
                      tuple((name, sha) for name, sha in contents["files"]),
                      tuple(dict.fromkeys(ids)), license if isinstance(license, str) else None)


def render_card(manifest: dict, sources: list[tuple[str, str]], inputs: list[InputFacts]) -> str:
    return "---\n" + yaml.safe_dump(front_matter(manifest, inputs), sort_keys=True) + "---\n\n" + recipe(
        manifest, sources, inputs)


def front_matter(manifest: dict, inputs: list[InputFacts]) -> dict:
    meta: dict = {"tags": ["cfmlang"] + sorted({_op_tag(e) for e in manifest["nodes"].values()} - {None})}
    if manifest.get("standard"):
        meta["library_name"] = "transformers"
    ids = sorted({i for facts in inputs for i in facts.hf_ids})
    if ids:
        meta["base_model"] = ids
    licenses = sorted({facts.license for facts in inputs if facts.license})
    if len(licenses) == 1 and all(facts.license for facts in inputs):
        meta["license"] = licenses[0]
    elif licenses:
        meta["license"] = "other"   # mixed or partly unknown: each input's is in the recipe
    return meta


def _op_tag(entry: dict) -> str | None:
    op = entry.get("op")
    return None if op in (None, "model") else str(op)


def recipe(manifest: dict, sources: list[tuple[str, str]], inputs: list[InputFacts]) -> str:
    lines = [f"# {manifest['output']}", "",
             f"Built by cfmlang {manifest['cfmlang_version']} (language version {manifest['language_version']}) "
             f"from `{manifest['source']['file']}`, seed {manifest['seed']}.", "", "## Source", ""]
    hashes = {entry["file"]: entry["sha256"] for entry in manifest["source"]["files"]}
    for name, text in sources:
        lines += [f"`{name}` (sha256 `{hashes.get(name, '?')}`):", "", "```", text.rstrip("\n"), "```", ""]
    lines += ["## Nodes", "", "Each node's entry in `cfm.json`: its method, parameters, and the "
              "verification and edit reports.", ""]
    for name, entry in manifest["nodes"].items():
        shown = {k: v for k, v in entry.items() if k not in NODE_FIELDS_NOT_IN_CARD}
        lines += [f"### {name}", "", "```json", json.dumps(shown, indent=2, sort_keys=True), "```", ""]
    lines += ["## Inputs", ""]
    for facts in inputs:
        lines += [f"### {facts.node}: {facts.tag} \"{facts.given}\"", ""]
        if facts.license:
            lines += [f"License: {facts.license}", ""]
        lines += ["| file | sha256 |", "| --- | --- |"] + [f"| {f} | `{h}` |" for f, h in facts.files] + [""]
    return "\n".join(lines)


def _front_matter(path: Path) -> dict:
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    if not match:
        return {}
    try:
        found = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return found if isinstance(found, dict) else {}


def _json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _gguf_general(path: Path) -> dict:
    """The GGUF file's `general.*` string fields."""
    try:
        header = gguf_header(path)
        return {k: header.string(k) for k, f in header.fields.items() if k.startswith("general.") and f.type == "STRING"}
    except (OSError, ValueError):
        return {}


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
