"""`cfmc eval` and `cfmlang.eval.evaluate` on tiny random models: every number is
checked against a reference computed here directly with transformers."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfmlang.cli import main
from cfmlang.diagnostics import CompileError
from cfmlang.eval import Settings, evaluate, load_task, shipped_tasks
from cfmlang.eval.report import render_table
from models import tiny_model, tiny_tokenizer

TEXT = "the sea is love and the sky is night for a poem of verse " * 3
CHOICES = [{"question": "the sea is", "choices": ["love", "night", "sky"], "answer": 1},
           {"question": "print the", "choices": ["number", "code"], "answer": 0},
           {"question": "a poem of", "choices": ["verse", "code", "math", "sum"], "answer": 0},
           {"question": "add the", "choices": ["number", "sky"], "answer": 1}]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "model"
    tiny_model(folder, seed=3)
    tiny_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return folder, model, AutoTokenizer.from_pretrained(folder)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def token_nlls(model, ids: list[int], context: int, stride: int = 1) -> list[float]:
    """NLL of each token t after the first, one forward pass per token: t is predicted in the
    window of `stride` targets that holds it, which sees the `context` tokens ending there."""
    nlls = []
    for t in range(1, len(ids)):
        end = min(1 + ((t - 1) // stride + 1) * stride, len(ids))
        window = torch.tensor([ids[max(0, end - context):t + 1]])
        with torch.no_grad():
            logits = model(window).logits[0, -2]
        nlls.append(-torch.log_softmax(logits, -1)[ids[t]].item())
    return nlls


def test_perplexity_in_one_window_is_exp_of_the_mean_loss(tiny, tmp_path):
    _, model, tokenizer = tiny
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    result = evaluate(model, tokenizer, [text], Settings(context=64, stride=63))
    metrics = result.tasks[0].metrics
    assert metrics["tokens"] == len(ids) - 1
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.mark.parametrize("context, stride", [(4, 1), (8, 5)])
def test_strided_perplexity_gives_every_token_its_window(tiny, tmp_path, context, stride):
    _, model, tokenizer = tiny
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:80])
    ids = tokenizer(TEXT[:80], add_special_tokens=False)["input_ids"]
    expected = math.exp(sum(token_nlls(model, ids, context, stride)) / (len(ids) - 1))
    got = evaluate(model, tokenizer, [text], Settings(context=context, stride=stride))
    assert got.metric("text", "perplexity") == pytest.approx(expected, rel=1e-5)
    whole = math.exp(sum(token_nlls(model, ids, len(ids), len(ids))) / (len(ids) - 1))
    assert got.metric("text", "perplexity") != pytest.approx(whole, rel=1e-4)    # the windows matter


def test_multiple_choice_matches_hand_computed_loglikelihoods(tiny, tmp_path):
    _, model, tokenizer = tiny
    task = write_jsonl(tmp_path / "mc.jsonl", CHOICES)
    expected = []
    for record in CHOICES:
        head = tokenizer(record["question"], add_special_tokens=False)["input_ids"]
        lls = []
        for choice in record["choices"]:
            whole = tokenizer(record["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0], -1)
            lls.append(sum(log_probs[p - 1, whole[p]].item() for p in range(len(head), len(whole))))
        expected.append(lls)
    for batch in (1, 3, 16):      # right padding must not change any score
        result = evaluate(model, tokenizer, [task], Settings(batch_size=batch)).tasks[0]
        for detail, lls in zip(result.details, expected):
            assert detail["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
    acc = sum(max(range(len(lls)), key=lls.__getitem__) == r["answer"] for lls, r in zip(expected, CHOICES))
    normed = [[ll / len(c) for ll, c in zip(lls, r["choices"])] for lls, r in zip(expected, CHOICES)]
    acc_norm = sum(max(range(len(n)), key=n.__getitem__) == r["answer"] for n, r in zip(normed, CHOICES))
    assert result.metrics == {"acc": acc / 4, "acc_norm": acc_norm / 4}
    assert evaluate(model, tokenizer, [task], Settings(limit=2)).tasks[0].items == 2


def greedy_words(model, tokenizer, prompt: str, steps: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tokenizer.decode(ids[-steps:])


def test_generation_exact_match_against_the_greedy_continuation(tiny, tmp_path):
    _, model, tokenizer = tiny
    own = greedy_words(model, tokenizer, "the sea", 3)
    first, second = own.split()[:2]
    task = write_jsonl(tmp_path / "gen.jsonl", [
        {"prompt": "the sea", "answer": own.upper() + ".", "max_tokens": 3},           # normalised match
        {"prompt": "the sea", "answer": first, "max_tokens": 3, "stop": [" " + second]},  # cut at the stop
        {"prompt": "the sea", "answer": ["nothing", "else"], "max_tokens": 3}])
    result = evaluate(model, tokenizer, [task]).tasks[0]
    assert [d["exact_match"] for d in result.details] == [1.0, 1.0, 0.0]
    assert result.details[0]["output"] == own and result.metrics["exact_match"] == pytest.approx(2 / 3)


def test_lm_eval_local_task_equals_the_builtin_scores(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, model, tokenizer = tiny
    write_jsonl(tmp_path / "items.jsonl", CHOICES)
    shipped = (load_task("facts_harness").path).read_text()
    (tmp_path / "harness.yaml").write_text(shipped.replace("facts.jsonl", "items.jsonl").replace("cfm_facts", "tiny_mc"))
    result = evaluate(model, tokenizer, [tmp_path / "items.jsonl", tmp_path / "harness.yaml"], Settings(batch_size=4))
    builtin, harness = result.tasks
    assert harness.kind == "lm_eval" and harness.items == builtin.items == 4
    assert harness.metrics["acc"] == builtin.metrics["acc"]
    assert harness.metrics["acc_norm"] == builtin.metrics["acc_norm"]
    for ours, theirs in zip(builtin.details, sorted(harness.details, key=lambda d: d["doc_id"])):
        assert theirs["loglikelihoods"] == pytest.approx(ours["loglikelihoods"], abs=1e-4)


def test_shipped_pack_loads():
    assert set(shipped_tasks()) == {"arithmetic", "counterfact_heldout", "counterfact_tuning", "facts",
                                    "facts_harness", "prose"}
    kinds = {name: load_task(name).kind for name in shipped_tasks()}
    assert kinds == {"arithmetic": "generation", "counterfact_heldout": "counterfact",
                     "counterfact_tuning": "counterfact", "facts": "multiple_choice", "facts_harness": "lm_eval",
                     "prose": "perplexity"}
    assert len(load_task("facts").items) == 20
    config = load_task("facts_harness").items[0]
    assert config["dataset_kwargs"]["data_files"]["test"] == str(load_task("facts").path)


# ---------------------------------------------------------------- the command

def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_and_table(tiny, tmp_path, capsys):
    folder, model, tokenizer = tiny
    task = write_jsonl(tmp_path / "mc.jsonl", CHOICES)
    code, out, err = run_cli(capsys, folder, "--task", task, "--format", "json", "--details")
    assert code == 0, err
    report = json.loads(out)
    expected = evaluate(model, tokenizer, [task])
    assert report["model"] == "model" and report["tasks"][0]["metrics"] == expected.tasks[0].metrics
    assert report["tasks"][0]["details"][0]["line"] == 1 and "mc (multiple_choice): 2 steps" in err  # 11 pairs, 8 a pass
    code, out, err = run_cli(capsys, folder, "--task", task, "-q")
    assert code == 0 and err == "" and out == render_table(expected)
    assert "acc_norm" in out and f"{expected.tasks[0].metrics['acc']:.4f}" in out


def test_cli_evaluates_a_brick_node(tiny, tmp_path, capsys):
    folder, model, tokenizer = tiny
    brick = tmp_path / "two.brick"
    brick.write_text(f'model base:\n  source: hf "{folder}"\nmodel other:\n  source: hf "{folder}"\n'
                     "merge mix:\n  method: linear\n  inputs: {base: {weight: 1.0}, other: {weight: 1.0}}\n"
                     "output: mix\n")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code, out, err = run_cli(capsys, f"{brick}:mix", "--task", text, "--format", "json",
                             "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == "two.brick:mix"
    expected = evaluate(model, tokenizer, [text]).tasks[0].metrics["perplexity"]
    assert report["tasks"][0]["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("content, args, code_expected, where", [
    (None, ["--task", "nope_task"], "E230", "no task `nope_task`"),
    (None, ["--task", "fact"], "E230", "did you mean `facts`"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"], "answer": 0}\n',
     [], "E231", "bad.jsonl:2:1"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0}\nnot json\n', [], "E231", "bad.jsonl:2:1"),
    ('{"prompt": "q", "answer": 3}\n', [], "E231", "`answer` must be a string"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 5}\n', [], "E231", "index of the right choice"),
    ('{"prompt": "q", "answer": "a"}\n', ["--limit", "0"], "E233", "--limit"),
    ('{"prompt": "q", "answer": "a"}\n', ["--context", "8", "--stride", "8"], "E233", "stride"),
])
def test_cli_refuses_bad_input(tiny, tmp_path, capsys, content, args, code_expected, where):
    folder = tiny[0]
    task_args = []
    if content is not None:
        (tmp_path / "bad.jsonl").write_text(content)
        task_args = ["--task", tmp_path / "bad.jsonl"]
    code, out, err = run_cli(capsys, folder, *task_args, *args)
    assert code == 1 and code_expected in err and where in err and "Traceback" not in err


def test_cli_refuses_bad_yaml_tasks(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "notyaml.yaml").write_text("task: [a\n")
    code, _, err = run_cli(capsys, tiny[0], "--task", tmp_path / "notyaml.yaml")
    assert code == 1 and "E231" in err and "notyaml.yaml:2:1" in err
    broken = load_task("facts_harness").path.read_text().replace("facts.jsonl", "missing.jsonl")
    (tmp_path / "broken.yaml").write_text(broken)
    code, _, err = run_cli(capsys, tiny[0], "--task", tmp_path / "broken.yaml", "-q")
    assert code == 1 and "E232" in err and "missing.jsonl" in err and "Traceback" not in err


def test_cli_refuses_a_missing_model_and_a_short_text(tiny, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("sea")
    code, _, err = run_cli(capsys, tmp_path / "none.brick", "--task", text)
    assert code == 1 and "E160" in err
    code, _, err = run_cli(capsys, tiny[0], "--task", text)
    assert code == 1 and "E234" in err and "short" in err


def test_response_perplexity_scores_only_the_responses(tiny, tmp_path):
    """prompt/response records (what lora bricks train on): exp of the mean NLL of each
    response's tokens and the end-of-sequence token after its prompt (no chat template
    here: the prompt and a newline)."""
    _, model, tokenizer = tiny
    records = [{"prompt": "the sea is", "response": "love and night"},
               {"prompt": "print the number", "response": "add the sum", "system": "ignored without a template"}]
    task = write_jsonl(tmp_path / "voice.jsonl", records)
    total, count = 0.0, 0
    for record in records:
        head = tokenizer(record["prompt"] + "\n", add_special_tokens=False)["input_ids"]
        tail = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([head + tail])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].float(), -1)
        total -= sum(log_probs[len(head) + i - 1, t].item() for i, t in enumerate(tail))
        count += len(tail)
    result = evaluate(model, tokenizer, [task], Settings(batch_size=1))
    assert load_task(task).kind == "response" and result.tasks[0].kind == "response"
    assert result.metric("voice", "tokens") == count
    assert result.metric("voice", "perplexity") == pytest.approx(math.exp(total / count), rel=1e-5)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": ""}])
    with pytest.raises(CompileError) as caught:
        load_task(bad)
    assert caught.value.diagnostics[0].code == "E231" and "`response`" in caught.value.diagnostics[0].message
