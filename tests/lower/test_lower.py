"""Lowering on tiny random models: export, inductor, the tensorrt input programs, the
data-dependence pass, generation with a static KV cache, and `cfmc bench`."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import LINEAR_MERGE, tiny_model

import cfmlang
from cfmlang.cli import main
from cfmlang.compiler.lower import LowerOptions
from cfmlang.compiler.lower import export as export_target
from cfmlang.compiler.lower import inductor as inductor_target
from cfmlang.compiler.lower.passes import data_dependent_ops, dynamic_inputs, tensorrt_unconverted
from cfmlang.compiler.lower.tensorrt import static_programs
from cfmlang.diagnostics import CompileError
from cfmlang.runtime.generation import LoweredModel, Sampler, StaticProgram
from paths import REPO, TESTS

MERGE = LINEAR_MERGE
FRESH_PROCESS = TESTS / "reload_pt2.py"
TRT_MISSING = importlib.util.find_spec("torch_tensorrt") is None


@pytest.fixture(scope="module")
def merged_export(tiny_zoo, tmp_path_factory) -> Path:
    """A linear merge of two tiny Llamas, compiled with `--target export` by the CLI."""
    folder = tmp_path_factory.mktemp("lower")
    (folder / "mix.brick").write_text(MERGE.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"]))
    code = main(["compile", str(folder / "mix.brick"), "-o", str(folder / "out"), "--target", "export", "-q"])
    assert code == 0
    return folder / "out"


def hf_greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, temperature=None,
                              top_p=None, top_k=None, pad_token_id=0)


def prompt_of(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_export_program_logits_match_eager_for_prefill_and_decode(merged_export):
    lowered, eager = cfmlang.load(merged_export), cfmlang.load(merged_export, target="eager")
    assert isinstance(lowered, LoweredModel) and lowered.target == "export"
    prompt = prompt_of(3, 11)
    with torch.inference_mode():
        reference = eager(prompt).logits
        logits, cache = lowered.prefill(prompt[:, :9], 16)
        assert (logits - reference[:, :9]).abs().max() < 1e-4
        for position in (9, 10):                    # one token at a time through the cache
            logits, cache = lowered.decode(prompt[:, position], position, cache)
            assert (logits[:, 0] - reference[:, position]).abs().max() < 1e-4
    assert (reference[:, 1:] - reference[:, :-1]).abs().max() > 1e-2   # the check can fail


def test_export_generate_is_hf_greedy_and_streams(merged_export):
    lowered, eager = cfmlang.load(merged_export), cfmlang.load(merged_export, target="eager")
    prompt = prompt_of(2, 7, seed=1)
    ours = lowered.generate(prompt, max_new_tokens=12, pad_token_id=0, eos_token_id=[])
    theirs = hf_greedy(eager, prompt, 12)
    assert ours.shape == (2, 19) and torch.equal(ours, theirs[:, :19])

    class Collect:                      # the streamer protocol of transformers: put() then end()
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, value):
            self.parts.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    single = lowered.generate(prompt[:1], max_new_tokens=5, streamer=streamer, eos_token_id=[])
    assert streamer.ended and streamer.parts[0] == prompt[0].tolist()
    assert [part[0] for part in streamer.parts[1:]] == single[0, 7:].tolist()


def test_export_sampling_is_seeded_and_a_tiny_nucleus_is_greedy(merged_export):
    lowered = cfmlang.load(merged_export)
    prompt = prompt_of(1, 5, seed=2)
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(lowered.generate(prompt, max_new_tokens=10, do_sample=True, temperature=1.5, eos_token_id=[]))
    assert torch.equal(draws[0], draws[1])
    greedy = lowered.generate(prompt, max_new_tokens=10, eos_token_id=[])
    assert not torch.equal(draws[0], greedy)            # temperature 1.5 on a random model wanders
    nucleus = lowered.generate(prompt, max_new_tokens=10, do_sample=True, top_p=1e-6, eos_token_id=[])
    assert torch.equal(nucleus, greedy)


def test_sampler_keeps_the_top_k_and_the_nucleus_with_their_probabilities():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    kept = Sampler(1.0, None, 0.8).filtered(logits)
    assert torch.isfinite(kept).tolist() == [[True, True, True, False, False]]  # 0.5+0.25 < 0.8
    assert torch.isfinite(Sampler(1.0, 2, None).filtered(logits)).sum() == 2
    torch.manual_seed(0)
    sampler = Sampler(1.0, None, 0.8)
    draws = torch.stack([sampler(logits.expand(4000, 5)) for _ in range(5)]).reshape(-1)
    frequencies = torch.bincount(draws, minlength=5).float() / draws.numel()
    expected = torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9
    assert (frequencies - expected).abs().max() < 0.015


def test_pt2_reloads_with_torch_export_load_in_a_fresh_process(merged_export):
    eager = cfmlang.load(merged_export, target="eager")
    prompt = prompt_of(1, 6, seed=3)
    expected = hf_greedy(eager, prompt, 10)[0, 6:].tolist()
    out = subprocess.run([sys.executable, str(FRESH_PROCESS), str(merged_export), json.dumps(prompt[0].tolist()),
                          "10"], capture_output=True, text=True, check=True)
    tokens = json.loads(out.stdout.strip().splitlines()[-1])
    assert tokens[:len(expected)] == expected


def test_cfmc_bench_reports_both_sides_and_ratios_as_json(merged_export, capsys):
    code = main(["bench", str(merged_export), "--batch", "1", "2", "--prompt-tokens", "5",
                 "--new-tokens", "3", "--repeat", "1", "--format", "json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "export" and [row["batch"] for row in result["results"]] == [1, 2]
    for row in result["results"]:
        assert row["same_greedy_tokens"] is True
        for phase in ("prefill", "decode"):
            cell = row[phase]
            assert cell["eager_tokens_per_s"] > 0 and cell["compiled_tokens_per_s"] > 0
            assert cell["ratio"] == pytest.approx(cell["compiled_tokens_per_s"] / cell["eager_tokens_per_s"],
                                                  rel=0.01, abs=1e-3)   # rounded to 3 decimals


def test_cfmc_bench_against_another_lowered_program(merged_export, capsys):
    """The anchor can be another artifact's program: here the same one, so the greedy
    tokens agree and the text names the anchor."""
    code = main(["bench", str(merged_export), "--against", str(merged_export), "--batch", "1",
                 "--prompt-tokens", "5", "--new-tokens", "3", "--repeat", "1"])
    assert code == 0
    text = capsys.readouterr().out
    assert f"export vs export {merged_export}" in text and text.rstrip().endswith("100%")


@pytest.mark.parametrize("per_core", [4.0, 0.1])
def test_cfmc_bench_flags_a_busy_machine(merged_export, capsys, monkeypatch, per_core):
    """The load average is read before and after the measurements: above half a runnable
    process per core, W200 says the ratios are not the machine's, on stderr whatever the
    format, and the JSON and the table say so too."""
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (per_core * (os.cpu_count() or 1), 0.0, 0.0))
    for form in ("json", "text"):
        code = main(["bench", str(merged_export), "--batch", "1", "--prompt-tokens", "5", "--new-tokens", "2",
                     "--repeat", "1", "--format", form])
        assert code == 0
        captured = capsys.readouterr()
        busy = per_core > 0.5
        assert ("warning[W200]: the machine was busy while benchmarking" in captured.err) == busy
        if form == "json":
            load = json.loads(captured.out)["load"]
            assert load["busy"] == busy and load["load_1min"] == pytest.approx(per_core * (os.cpu_count() or 1))
        else:
            assert ("(busy: the ratios are not this machine's)" in captured.out) == busy


def test_load_refuses_a_target_the_artifact_does_not_hold(merged_export):
    with pytest.raises(CompileError) as caught:
        cfmlang.load(merged_export, target="inductor")
    assert caught.value.diagnostics[0].code == "E175"
    with pytest.raises(CompileError) as caught:
        cfmlang.load(merged_export, target="tensorrtt")
    assert caught.value.diagnostics[0].code == "E170" and "tensorrt" in caught.value.diagnostics[0].help[0]


class NonzeroMLP(torch.nn.Module):
    """An MLP that runs only the rows with a positive first feature: a data-dependent shape."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        rows = flat[:, 0].gt(0).nonzero().squeeze(-1)
        return flat.index_add(0, rows, self.mlp(flat[rows])).reshape(x.shape)


def test_a_data_dependent_op_fails_the_lowering(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_zoo["llama_a"]).eval()
    model.model.layers[1].mlp = NonzeroMLP(model.model.layers[1].mlp)
    with pytest.raises(CompileError) as caught:
        export_target.lower(model, tmp_path, LowerOptions(target="export"), print)
    diagnostic = caught.value.diagnostics[0]
    assert diagnostic.code == "E171" and "nonzero" in diagnostic.message
    assert not (tmp_path / export_target.PROGRAM).exists()


def test_tensorrt_input_programs_are_static_and_compute_the_model(tiny_zoo):
    """Everything up to torch_tensorrt's compile call, on CPU: the static prefill and decode
    programs, run as exported, generate HF's greedy tokens through padding."""
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_zoo["llama_c"]).eval()
    options = LowerOptions(target="tensorrt", precision="float32", batch=2, prompt_length=8, cache_length=24)
    programs = static_programs(eager, options)
    for name, (program, args) in programs.items():
        assert dynamic_inputs(program) == [] and data_dependent_ops(program) == []
        assert args[0].shape == (2, 8 if name == "prefill" else 1)
        assert {tuple(k.shape) for k in args[2]} == {(2, 2, 24, 8)}
    static = {"batch": 2, "prompt_length": 8, "cache_length": 24}
    program = StaticProgram(programs["prefill"][0].module(), programs["decode"][0].module(), static)
    entry = {"target": "tensorrt", "dtype": "float32", "static": static, "files": {}}
    lowered = LoweredModel(tiny_zoo["llama_c"], entry, "cpu", program=program)
    prompt = prompt_of(1, 5, seed=4)                          # shorter prompt, smaller batch: padded
    assert torch.equal(lowered.generate(prompt, max_new_tokens=9, eos_token_id=[]),
                       hf_greedy(eager, prompt, 9)[:, :14])
    with pytest.raises(CompileError) as caught:
        lowered.generate(prompt, max_new_tokens=40)
    assert caught.value.diagnostics[0].code == "E176"


def test_tensorrt_programs_cast_the_graph_to_float16(tiny_zoo):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_zoo["llama_c"]).eval().half()
    program, _ = static_programs(model, LowerOptions(target="tensorrt", batch=1, prompt_length=4,
                                                     cache_length=8))["decode"]
    dtypes = {value.dtype for value in program.state_dict.values()}
    assert dtypes == {torch.float16}
    report = tensorrt_unconverted(program)         # None: torch_tensorrt is not installed to ask
    assert report is None if TRT_MISSING else isinstance(report, list)


@pytest.mark.skipif(not TRT_MISSING,
                    reason="torch_tensorrt is installed: the missing-package diagnostic cannot happen")
def test_tensorrt_without_torch_tensorrt_says_so_and_names_the_target_to_use(tiny_zoo, tmp_path, capsys):
    source = tmp_path / "one.brick"
    source.write_text(f'model a:\n  source: hf "{tiny_zoo["llama_a"]}"\noutput: a\n')
    assert main(["compile", str(source), "-o", str(tmp_path / "out"), "--target", "tensorrt"]) == 1
    err = capsys.readouterr().err
    assert "error[E172]" in err and "torch_tensorrt" in err and "--target inductor" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(TRT_MISSING or not torch.cuda.is_available(),
                    reason="needs torch_tensorrt and a CUDA GPU (neither is on CI)")
def test_tensorrt_compiles_and_generates_greedy_tokens(tiny_zoo, tmp_path):
    source = tmp_path / "one.brick"
    source.write_text(f'model a:\n  source: hf "{tiny_zoo["llama_a"]}"\noutput: a\n')
    assert main(["compile", str(source), "-o", str(tmp_path / "out"), "--target", "tensorrt", "--device", "cuda",
                 "--precision", "float32", "--prompt-length", "8", "--cache-length", "32"]) == 0
    lowered, eager = cfmlang.load(tmp_path / "out"), cfmlang.load(tmp_path / "out", target="eager")
    prompt = prompt_of(1, 6)
    ours = lowered.generate(prompt.cuda(), max_new_tokens=8, eos_token_id=[]).cpu()
    assert torch.equal(ours, hf_greedy(eager, prompt, 8)[:, :14])


@pytest.fixture(scope="module")
def inductor_artifact(tiny_zoo, tmp_path_factory) -> Path:
    """The linear merge of two tiny Llamas as an AOTInductor package (random weights: not
    block values, so nothing is packed and the package is one float32 program)."""
    folder = tmp_path_factory.mktemp("inductor")
    result = cfmlang.compile(MERGE.format(a=tiny_zoo["llama_a"], b=tiny_zoo["llama_b"]), folder / "out",
                             target="inductor")
    assert result.manifest["lowered"]["files"] == {"program": "lowered/model_inductor.pt2"}
    assert "packing" not in result.manifest["lowered"]
    return folder / "out"


def test_inductor_package_logits_and_greedy_tokens_match_eager(inductor_artifact):
    lowered, eager = cfmlang.load(inductor_artifact), cfmlang.load(inductor_artifact, target="eager")
    assert lowered.target == "inductor"
    prompt = prompt_of(2, 9, seed=6)
    with torch.inference_mode():
        reference = eager(prompt).logits
        logits, cache = lowered.prefill(prompt[:, :8], 12)
        assert (logits - reference[:, :8]).abs().max() < 1e-4
        logits, cache = lowered.decode(prompt[:, 8], 8, cache)
        assert (logits[:, 0] - reference[:, 8]).abs().max() < 1e-4
    assert torch.equal(lowered.generate(prompt, max_new_tokens=8, eos_token_id=[]),
                       hf_greedy(eager, prompt, 8)[:, :17])


def test_an_inductor_program_loads_only_when_built_here_or_trusted(inductor_artifact, tmp_path, monkeypatch):
    """Native code another machine built (here: a cache whose trust list is empty) is
    refused before anything loads it; `trust_code=True` loads it, and it computes."""
    monkeypatch.setenv("CFM_CACHE_DIR", str(tmp_path / "another-machine"))
    with pytest.raises(CompileError) as refused:
        cfmlang.load(inductor_artifact)
    assert [d.code for d in refused.value.diagnostics] == ["E211"]
    trusted, eager = cfmlang.load(inductor_artifact, trust_code=True), cfmlang.load(inductor_artifact, target="eager")
    prompt = prompt_of(1, 5, seed=3)
    with torch.inference_mode():
        assert (trusted(prompt).logits - eager(prompt).logits).abs().max() < 1e-4


class RotaryTable(torch.nn.Module):
    """cos and sin of a Llama's rotary embedding at the given positions."""

    def __init__(self, rotary):
        super().__init__()
        self.rotary = rotary

    def forward(self, positions):
        return torch.cat(self.rotary(positions.float().unsqueeze(-1), positions.unsqueeze(0)))


def test_inductor_leaves_means_and_rotary_cos_sin_to_aten_so_they_are_eager_bits(tmp_path):
    """Inductor's own reduction sums a row in another order than ATen's mean, and its cos and
    sin are not ATen's; under `aten_kernels` an AOTInductor RMSNorm and rotary table give
    eager's bits, and Inductor's lowering table is as before afterwards."""
    from torch._inductor import lowering
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    norm = LlamaRMSNorm(576, eps=1e-5)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=generator))
    rotary = RotaryTable(LlamaRotaryEmbedding(LlamaConfig(hidden_size=576, num_attention_heads=9)))
    cases = {"norm": (norm, torch.randn(7, 576, generator=generator) * 3), "rotary": (rotary, torch.arange(300))}
    before = {op: lowering.lowerings[op] for op in inductor_target.EAGER_BIT_OPS}
    for name, (module, x) in cases.items():
        program = torch.export.export(module, (x,))
        outputs = {}
        for exact in (False, True):
            path = tmp_path / f"{name}_{exact}.pt2"
            with inductor_target.aten_kernels(print) if exact else contextlib.nullcontext():
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
            outputs[exact] = torch._inductor.aoti_load_package(str(path))(x)
        reference = module(x)
        assert torch.equal(outputs[True], reference), name
        assert not torch.equal(outputs[False], reference), name   # the difference it removes is there
    assert {op: lowering.lowerings[op] for op in inductor_target.EAGER_BIT_OPS} == before


ROUTED = ('model m:\n  source: hf "{model}"\n'
          "brick e:\n  kind: experts\n  from: m.layers[*].mlp\n  split: kmeans\n  count: 8\n"
          "route r:\n  method: topk\n  experts: e\n  router: similarity\n  k: {k}\n"
          "output: r\n")


def test_a_routed_model_of_smollm2_width_prefills_with_eager_bits_under_inductor(tmp_path):
    """At SmolLM2's widths (2 random layers), the inductor prefill program of a routed model
    computes eager's logits bit for bit: Inductor's means and rotary cos/sin were the only
    ops whose bits differed. (At the 32-wide test models' sizes the program still differs
    from eager in the last bits.) Compiled with grad off, when Inductor would freeze the
    weights unless told not to (its oneDNN-prepacked linears change the bits)."""
    model = tiny_model(tmp_path / "wide", 5, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                       num_attention_heads=9, num_key_value_heads=3, vocab_size=256, max_position_embeddings=128)
    routed = ROUTED.replace("count: 8", "count: 24").format(model=model, k=12)
    with torch.no_grad():
        cfmlang.compile(routed, tmp_path / "routed", target="inductor")
    lowered, eager = cfmlang.load(tmp_path / "routed"), cfmlang.load(tmp_path / "routed", target="eager")
    prompt = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = eager(prompt).logits
        logits, cache = lowered.prefill(prompt[:, :20], 24)
        assert torch.equal(logits, eager(prompt[:, :20]).logits)
        logits, cache = lowered.decode(prompt[:, 20], 20, cache)
        assert (logits[:, 0] - reference[:, 20]).abs().max() < 1e-4


def test_routed_experts_lower_to_masked_prefill_and_gather_decode(tiny_zoo, tmp_path):
    """A routed model (2 of 8 experts per token) exports as two programs whose logits and
    greedy tokens are the eager routed model's."""
    result = cfmlang.compile(ROUTED.format(model=tiny_zoo["llama_b"], k=2), tmp_path / "routed", target="export")
    lowered_entry = result.manifest["lowered"]
    assert lowered_entry["files"] == {"prefill": "lowered/prefill.pt2", "decode": "lowered/decode.pt2"}
    assert lowered_entry["routed_layers"] == 4
    lowered, eager = cfmlang.load(tmp_path / "routed"), cfmlang.load(tmp_path / "routed", target="eager")
    prompt = prompt_of(2, 9, seed=8)
    with torch.inference_mode():
        reference = eager(prompt).logits                       # 18 tokens: the masked formulation
        logits, cache = lowered.prefill(prompt[:, :8], 12)
        assert (logits - reference[:, :8]).abs().max() < 1e-4
        logits, cache = lowered.decode(prompt[:, 8], 8, cache)   # 2 tokens: gather
        assert (logits[:, 0] - reference[:, 8]).abs().max() < 1e-4
    assert torch.equal(lowered.generate(prompt, max_new_tokens=6, eos_token_id=[]),
                       hf_greedy(eager, prompt, 6)[:, :15])
    decode_program = torch.export.load(tmp_path / "routed" / "lowered" / "decode.pt2")
    ops = {str(node.target) for node in decode_program.graph.nodes if node.op == "call_function"}
    assert any("embedding_bag" in op for op in ops) and data_dependent_ops(decode_program) == []



def test_neuron_experts_decode_by_gathering_weight_rows(tiny_zoo, tmp_path):
    """One neuron per expert (quantized router): the decode program gathers the chosen
    neurons' gate and up rows from gate_up viewed [2 * neurons, hidden], one row per index,
    which Inductor vectorizes (gathering [2 * hidden] blocks made it index through a modulo
    and run scalar), and its logits are the eager routed model's."""
    brick = (ROUTED.replace("split: kmeans", "split: random").replace("count: 8", "count: 64")
             .replace("router: similarity", "router: quantized").format(model=tiny_zoo["llama_b"], k=16))
    cfmlang.compile(brick, tmp_path / "routed", target="export")
    lowered, eager = cfmlang.load(tmp_path / "routed"), cfmlang.load(tmp_path / "routed", target="eager")
    prompt = prompt_of(1, 9, seed=4)
    with torch.inference_mode():
        reference = eager(prompt).logits
        logits, cache = lowered.prefill(prompt[:, :8], 12)
        logits, cache = lowered.decode(prompt[:, 8], 8, cache)
        assert (logits[:, 0] - reference[:, 8]).abs().max() < 1e-4
    decode_program = torch.export.load(tmp_path / "routed" / "lowered" / "decode.pt2")
    gathers = [(tuple(node.args[0].meta["val"].shape), node.args[1].meta["val"].shape[-1])
               for node in decode_program.graph.nodes if node.target == torch.ops.aten.embedding.default]
    token_embedding = ((128, 32), 1)
    assert gathers == [token_embedding] + [((128, 32), 32)] * 4   # 16 neurons: 32 rows per token

def test_gpu_check_script_runs_its_steps_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh with DEVICE=cpu: the correctness check and the bench, in one go."""
    from models import tiny_tokenizer

    model = tiny_tokenizer(tiny_model(tmp_path / "model", seed=9, num_hidden_layers=2))
    (tmp_path / "one.brick").write_text(f'model a:\n  source: hf "{model}"\noutput: a\n')
    script = REPO / "benchmarks" / "gpu_check.sh"
    env = {**__import__("os").environ, "PYTHON": sys.executable, "DEVICE": "cpu", "TARGETS": "export",
           "BRICK": str(tmp_path / "one.brick"), "OUT": str(tmp_path / "out"),
           "BENCH_ARGS": "--batch 1 --prompt-tokens 4 --new-tokens 2 --repeat 1"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    check = json.loads((tmp_path / "out" / "check.jsonl").read_text().splitlines()[0])
    assert check["passed"] and check["same_greedy_tokens"] and check["fresh_process_same_tokens"]
    assert check["max_abs_logit_diff"] < 1e-4
    bench = json.loads((tmp_path / "out" / "bench_export.json").read_text())
    assert bench["results"][0]["decode"]["ratio"] > 0 and "ratio" in (tmp_path / "out" / "bench_export.txt").read_text()


def test_an_architecture_outside_the_llama_family_is_E173(tmp_path):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    config = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=64)
    GemmaForCausalLM(config).save_pretrained(tmp_path / "gemma")
    with pytest.raises(CompileError) as caught:
        cfmlang.compile(f'model g:\n  source: hf "{tmp_path / "gemma"}"\noutput: g\n', tmp_path / "out",
                        target="export")
    assert caught.value.diagnostics[0].code == "E173" and "gemma" in caught.value.diagnostics[0].message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("others_per_core, busy", [(0.1, False), (0.8, True)])
def test_cfmc_bench_does_not_count_its_own_threads_as_other_work(merged_export, capsys, monkeypatch,
                                                                  others_per_core, busy):
    """The reading after the measurements includes the benchmark's own threads: only the
    load above them says whether other processes shared the cores."""
    import os

    cores = os.cpu_count() or 1
    readings = iter([(0.1 * cores, 0.0, 0.0), (torch.get_num_threads() + others_per_core * cores, 0.0, 0.0)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(readings))
    code = main(["bench", str(merged_export), "--batch", "1", "--prompt-tokens", "5", "--new-tokens", "2",
                 "--repeat", "1", "--format", "json"])
    assert code == 0
    captured = capsys.readouterr()
    assert ("warning[W200]" in captured.err) == busy
    assert json.loads(captured.out)["load"]["busy"] == busy
