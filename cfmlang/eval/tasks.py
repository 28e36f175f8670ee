"""Task definitions: which file holds a task, which kind it is, its items, checked.

A task is a file, or the name of one in the shipped pack (`cfmlang/eval/tasks/`):
- `NAME.txt`: perplexity over the text;
- `NAME.jsonl` with `question`, `choices`, `answer` (index) fields: multiple choice;
- `NAME.jsonl` with `prompt` and `answer` (a string or a list of accepted strings),
  optional `stop` (strings) and `max_tokens`: generation, exact match;
- `NAME.jsonl` with `prompt`, `subject`, `target_true`, `target_new`, `paraphrases` and
  `neighbourhood` (prompts whose true answer is also target_true): counterfact, the
  CounterFact metrics of knowledge edits (`cfmlang.eval.counterfact`);
- `NAME.jsonl` with `prompt` and `response` (optional `system`), the records LoRA bricks
  train on: perplexity of the responses after their prompts;
- `NAME.yaml`: an lm-evaluation-harness task config (a relative `data_files` path is
  taken relative to the YAML file, so local `dataset_path: json` tasks run offline).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfmlang.diagnostics import CompileError, Span, did_you_mean, error
from cfmlang.io.datafile import read_data_text

PACK = Path(__file__).resolve().parent / "tasks"
SUFFIXES = (".txt", ".jsonl", ".yaml", ".yml")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                   # perplexity | multiple_choice | generation | counterfact | response | lm_eval
    path: Path
    items: tuple[Any, ...]      # the text (perplexity), the records (jsonl), the config (lm_eval)


def shipped_tasks() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in PACK.iterdir() if p.suffix in SUFFIXES))


def load_task(name_or_file: str | Path) -> Task:
    """The task of a file, or of a shipped task name (see `shipped_tasks()`)."""
    path = task_path(str(name_or_file))
    if path.suffix == ".txt":
        return Task(path.stem, "perplexity", path, (read_text(path),))
    if path.suffix == ".jsonl":
        records = read_records(path)
        kind = record_kind(path, records)
        return Task(path.stem, kind, path, tuple(records))
    return Task(path.stem, "lm_eval", path, (read_harness_config(path),))


def task_path(text: str) -> Path:
    path = Path(text)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise CompileError([error("E230", f"`{text}` is not a task file: its suffix is not one of "
                                      f"{', '.join(SUFFIXES)}", None, "see `cfmc eval --help` for the formats")])
        return path
    for suffix in SUFFIXES:
        if (PACK / f"{text}{suffix}").is_file() and "/" not in text:
            return PACK / f"{text}{suffix}"
    raise CompileError([error("E230", f"no task `{text}`: neither a file nor a shipped task", None,
                              did_you_mean(text, shipped_tasks()),
                              f"shipped tasks: {', '.join(shipped_tasks())}")])


def read_text(path: Path) -> str:
    try:
        text = read_data_text(path)
    except UnicodeDecodeError as exc:
        raise malformed(path, 1, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise malformed(path, 1, f"cannot be read: {exc}") from None
    if not text.strip():
        raise malformed(path, 1, "is empty")
    return text


def read_records(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise malformed(path, number, f"is not JSON: {exc}", getattr(exc, "colno", 1)) from None
        if not isinstance(record, dict):
            raise malformed(path, number, "is not a JSON object")
        records.append({**record, "_line": number})
    return records


def record_kind(path: Path, records: list[dict]) -> str:
    kind = "multiple_choice" if "choices" in records[0] else "counterfact" if "target_new" in records[0] \
        else "response" if "response" in records[0] else "generation"
    check = {"multiple_choice": check_choice, "counterfact": check_counterfact, "response": check_response,
             "generation": check_generation}[kind]
    problems = [problem for record in records for problem in check(path, record)]
    if problems:
        raise CompileError(problems)
    return kind


def check_choice(path: Path, record: dict) -> list:
    choices, answer = record.get("choices"), record.get("answer")
    found = []
    if not isinstance(record.get("question"), str):
        found.append("`question` must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        found.append("`choices` must be a list of at least two non-empty strings")
    elif not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        found.append(f"`answer` must be the index of the right choice (0 to {len(choices) - 1})")
    return [record_error(path, record, p, "a multiple-choice record is "
                         '{"question": "...", "choices": ["...", "..."], "answer": 0}') for p in found]


def check_response(path: Path, record: dict) -> list:
    found = []
    if not isinstance(record.get("prompt"), str):
        found.append("`prompt` must be a string")
    if not (isinstance(record.get("response"), str) and record["response"]):
        found.append("`response` must be a non-empty string")
    if not isinstance(record.get("system", ""), str):
        found.append("`system` must be a string")
    return [record_error(path, record, p, 'a response record is {"prompt": "...", "response": "..."} '
                         'with an optional "system": "..."') for p in found]


def check_generation(path: Path, record: dict) -> list:
    answer, stop, tokens = record.get("answer"), record.get("stop", []), record.get("max_tokens", 1)
    found = []
    if not isinstance(record.get("prompt"), str):
        found.append("`prompt` must be a string")
    if not (isinstance(answer, str) or (isinstance(answer, list) and answer and
                                        all(isinstance(a, str) for a in answer))):
        found.append("`answer` must be a string or a non-empty list of strings")
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        found.append("`stop` must be a list of non-empty strings")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        found.append("`max_tokens` must be a positive whole number")
    return [record_error(path, record, p, 'a generation record is {"prompt": "...", "answer": "..."} '
                         'with optional "stop": [...] and "max_tokens": N') for p in found]


def check_counterfact(path: Path, record: dict) -> list:
    found = []
    strings = {key: record.get(key) for key in ("prompt", "subject", "target_true", "target_new")}
    bad = [key for key, value in strings.items() if not isinstance(value, str) or not value.strip()]
    if bad:
        found.append(f"`{bad[0]}` must be a non-empty string")
    elif strings["subject"] not in strings["prompt"]:
        found.append(f"subject `{strings['subject']}` does not occur in the prompt")
    elif strings["target_true"].strip() == strings["target_new"].strip():
        found.append("`target_new` must differ from `target_true`")
    for key in ("paraphrases", "neighbourhood"):
        value = record.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            found.append(f"`{key}` must be a list of non-empty strings")
    return [record_error(path, record, p, 'a counterfact record is {"prompt": "...", "subject": "...", '
                         '"target_true": " ...", "target_new": " ...", "paraphrases": [...], '
                         '"neighbourhood": [...]}') for p in found]


def read_harness_config(path: Path) -> dict:
    import yaml

    try:
        config = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise malformed(path, mark.line + 1 if mark else 1, f"is not YAML: {getattr(exc, 'problem', exc)}",
                        mark.column + 1 if mark else 1) from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise malformed(path, 1, "is not an lm-eval task config (a mapping with a `task` name)")
    return local_data_files(path, config)


def local_data_files(path: Path, config: dict) -> dict:
    """The config with relative `dataset_kwargs.data_files` paths made relative to the YAML."""
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if files is None:
        return config

    def resolved(value):
        if isinstance(value, str):
            return str(path.parent / value) if not Path(value).is_absolute() else value
        if isinstance(value, list):
            return [resolved(v) for v in value]
        if isinstance(value, dict):
            return {k: resolved(v) for k, v in value.items()}
        return value
    return {**config, "dataset_kwargs": {**kwargs, "data_files": resolved(files)}}


def record_error(path: Path, record: dict, problem: str, hint: str):
    return error("E231", f"task record {problem}", Span.point(str(path), record["_line"], 1), hint)


def malformed(path: Path, line: int, problem: str, col: int = 1) -> CompileError:
    return CompileError([error("E231", f"task file {path.name} {problem}", Span.point(str(path), line, col),
                               "see `cfmc eval --help` for the task formats")])
