"""Every operation on tiny random models of every family: each cell is compiled and then
either equals its oracle or is the documented, located diagnostic that names the family.

Oracles (none of them cfmlang's own code):
- merges: mergekit 0.1.5's own tensor function of the method, tensor by tensor (random
  methods at density 1 and epsilon 0, where they are deterministic); gradients and
  filter maps through the layer position the test computes from the family's prefix;
- grow: `stack` copies the slices it names; `block_expand`, `widen`, `upcycle` and `moe`
  over two copies of one model preserve the function (logits equal the input's);
- LoRA bricks: PEFT (`merge_and_unload`, `add_weighted_adapter`, loading the adapter);
  an extracted adapter is the truncated SVD of the weight difference;
- experts: a top-k route with k = E computes the dense model;
- update: the edit report (the target's probability rises) and only the edited or
  trained tensors change;
- lowering: the exported and the inductor programs' logits (prefill and a decode step)
  equal eager transformers' within 1e-4.
Every written model also has as many layers in its config as in its weights.

`docs/architectures.md` is generated from the same cells (`CFM_WRITE_DOCS=1 pytest
tests/compiler/test_family_matrix.py`) and a test keeps it equal to what the code does.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers

import cfmlang
from cfmlang.diagnostics import CompileError
from families import CASES, LAYERS, Case
from mergekit_oracle import tensors
from paths import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[3, 4, 5, 6, 7, 8]])
TEXT = "the sea and the sky\na poem of love at night\nthe code in the loop\n"
FACT = {"prompt": "the sky of the sea", "subject": "sea", "target": " poem"}
HEAD = 'model a:\n  source: hf "a"\nmodel b:\n  source: hf "b"\nmodel c:\n  source: hf "c"\n'
LORA = 'brick l:\n  kind: lora\n  source: peft "adapter"\n  base: a\n'
LORA2 = 'brick l2:\n  kind: lora\n  source: peft "adapter2"\n  base: a\n'


# ---- the family's tiny models --------------------------------------------------------------

@dataclass
class Family:
    case: Case
    root: Path
    config: dict

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        return tensors(self.root / name)

    def layer_of(self, name: str) -> int | None:
        prefix = self.case.layers + "."
        return int(name[len(prefix):].split(".", 1)[0]) if name.startswith(prefix) else None

    def position(self, name: str) -> float:
        layer = self.layer_of(name)
        return 0.0 if layer is None else layer / (LAYERS - 1)


def save_model(case: Case, folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, case.config)(**case.kwargs))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model.save_pretrained(folder)


def save_adapter(case: Case, base: Path, folder: Path, seed: int) -> None:
    """A PEFT adapter on the family's attention input projections, made by PEFT itself,
    with non-zero random factors."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=4, target_modules=list(case.lora)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder)


def make_family(case: Case, root: Path) -> Family:
    from models import byte_bpe_tokenizer

    for seed, name in enumerate("abc", 1):
        save_model(case, root / name, seed)
        byte_bpe_tokenizer(root / name)
    save_adapter(case, root / "a", root / "adapter", 1)
    save_adapter(case, root / "a", root / "adapter2", 2)
    (root / "train.txt").write_text(TEXT)
    return Family(case, root, json.loads((root / "a" / "config.json").read_text()))


# ---- oracles -------------------------------------------------------------------------------

def load(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def same_function(fam: Family, out: Path, tolerance: float = 1e-4) -> None:
    difference = (logits_of(load(out)) - logits_of(load(fam.root / "a"))).abs().max().item()
    assert difference <= tolerance, f"logits differ from the input's by {difference}"


def layer_count_matches(fam: Family, out: Path) -> None:
    """No silently partial output: the config's layer count is the weights'."""
    config = json.loads((out / "config.json").read_text())
    section = config.get("text_config", config)
    key = next(k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in section)
    layers = {fam.layer_of(n) for n in tensors(out)} - {None}
    assert layers == set(range(section[key])), (section[key], sorted(layers))


def mergekit_tensor(method: str, base, others, parameters: dict) -> torch.Tensor:
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get

    group = TensorGroup.from_tensors(([base] if base is not None else []) + others,
                                     base_index=0 if base is not None else None)
    return get(method)([group], parameters=parameters)[0]


@dataclass(frozen=True)
class MergeCase:
    """A merge statement and mergekit's parameters for it (per input: lists over inputs)."""
    method: str
    base: bool
    inputs: tuple[str, ...]
    brick: str                     # the statement's body after method/base
    parameters: Callable[[float], dict]   # t (layer position) -> mergekit's parameters


W2 = "  inputs:\n    b: {weight: 0.3}\n    c: {weight: 0.6}\n"
SPARSE = "  inputs:\n    b: {weight: 0.3, density: 1.0}\n    c: {weight: 0.6, density: 1.0}\n"
MERGES = [
    MergeCase("linear", False, ("a", "b"), "  inputs:\n    a: {weight: [0.2, 0.8]}\n    b: {weight: 0.5}\n",
              lambda t: {"weight": [0.2 + 0.6 * t, 0.5]}),
    MergeCase("task_arithmetic", True, ("b", "c"), "  inputs:\n    b: {weight: {attn: [0.1, 0.9], default: 0.3}}\n"
              "    c: {weight: 0.6}\n", None),   # filter map: parameters per tensor name, below
    MergeCase("ties", True, ("b", "c"), "  inputs:\n    b: {weight: 0.3, density: 0.5}\n    c: {weight: 0.6, density: 0.5}\n",
              lambda t: {"weight": [0.3, 0.6], "density": [0.5, 0.5]}),
    MergeCase("dare_ties", True, ("b", "c"), SPARSE, lambda t: {"weight": [0.3, 0.6], "density": [1.0, 1.0]}),
    MergeCase("dare_linear", True, ("b", "c"), SPARSE, lambda t: {"weight": [0.3, 0.6], "density": [1.0, 1.0]}),
    MergeCase("della", True, ("b", "c"), SPARSE.replace("density: 1.0}", "density: 1.0, epsilon: 0.0}"),
              lambda t: {"weight": [0.3, 0.6], "density": [1.0, 1.0], "epsilon": [0.0, 0.0]}),
    MergeCase("della_linear", True, ("b", "c"), SPARSE.replace("density: 1.0}", "density: 1.0, epsilon: 0.0}"),
              lambda t: {"weight": [0.3, 0.6], "density": [1.0, 1.0], "epsilon": [0.0, 0.0]}),
    MergeCase("breadcrumbs", True, ("b", "c"), SPARSE.replace("density: 1.0}", "density: 0.9, gamma: 0.01}"),
              lambda t: {"weight": [0.3, 0.6], "density": [0.9, 0.9], "gamma": [0.01, 0.01]}),
    MergeCase("breadcrumbs_ties", True, ("b", "c"), SPARSE.replace("density: 1.0}", "density: 0.9, gamma: 0.01}"),
              lambda t: {"weight": [0.3, 0.6], "density": [0.9, 0.9], "gamma": [0.01, 0.01]}),
    MergeCase("slerp", True, ("b",), "  inputs: [b]\n  t: [0, 1]\n", lambda t: {"t": t}),
    MergeCase("nuslerp", True, ("b", "c"), W2, lambda t: {"weight": [0.3, 0.6]}),
    MergeCase("multislerp", False, ("a", "b"), "  inputs:\n    a: {weight: 0.3}\n    b: {weight: 0.6}\n",
              lambda t: {"weight": [0.3, 0.6]}),
    MergeCase("karcher", False, ("a", "b"), "  inputs: [a, b]\n", lambda t: {}),
    MergeCase("model_stock", True, ("b", "c"), "  inputs: [b, c]\n", lambda t: {}),
    MergeCase("nearswap", True, ("b",), "  inputs: [b]\n  t: 0.02\n", lambda t: {"t": 0.02}),
    MergeCase("sce", True, ("b", "c"), "  inputs: [b, c]\n", lambda t: {}),
    MergeCase("ram", True, ("b", "c"), "  inputs: [b, c]\n", lambda t: {}),
    MergeCase("ramplus_tl", True, ("b", "c"), "  inputs: [b, c]\n", lambda t: {}),
    MergeCase("arcee_fusion", True, ("b",), "  inputs: [b]\n", lambda t: {}),
    MergeCase("passthrough", False, ("a",), "  inputs: [a]\n", lambda t: {}),
]


def merge_brick(case: MergeCase) -> str:
    return f"merge x:\n  method: {case.method}\n" + ("  base: a\n" if case.base else "") + case.brick


def merge_oracle(case: MergeCase) -> Callable[[Family, Path, dict], None]:
    def check(fam: Family, out: Path, manifest: dict) -> None:
        models = {name: fam.weights(name) for name in "abc"}
        merged = tensors(out)
        assert merged.keys() == models["a"].keys()
        for name, value in merged.items():
            t = fam.position(name)
            if case.parameters is None:     # the filter map: `attn` tensors follow the gradient
                parameters = {"weight": [0.1 + 0.8 * t if "attn" in name else 0.3, 0.6]}
            else:
                parameters = case.parameters(t)
            base = models["a"][name] if case.base else None
            expected = mergekit_tensor(case.method, base, [models[i][name] for i in case.inputs], parameters)
            torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-4, atol=1e-5, msg=name)
        layer_count_matches(fam, out)
    return check


def stack_oracle(fam: Family, out: Path, manifest: dict) -> None:
    a, b = fam.weights("a"), fam.weights("b")
    sources = [(a, 0), (a, 1), (b, 1), (b, 2)]
    stacked = tensors(out)
    for name, value in stacked.items():
        layer = fam.layer_of(name)
        if layer is not None:
            model, origin = sources[layer]
            inner = name[len(f"{fam.case.layers}.{layer}."):]
            assert torch.equal(value, model[f"{fam.case.layers}.{origin}.{inner}"]), name
    layer_count_matches(fam, out)
    assert torch.isfinite(logits_of(load(out))).all()


def identity_oracle(fam: Family, out: Path, manifest: dict) -> None:
    layer_count_matches(fam, out)
    same_function(fam, out)


def peft_fused(fam: Family, *adapters: str):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(fam.root / "a"), fam.root / adapters[0], adapter_name="first")
    for index, adapter in enumerate(adapters[1:]):
        model.load_adapter(fam.root / adapter, adapter_name=f"more{index}")
    return model


def source_oracle(fam: Family, out: Path, manifest: dict) -> None:
    from safetensors.torch import load_file

    ours = load_file(out / "adapter_model.safetensors")
    theirs = load_file(fam.root / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


def fused_equal(fam: Family, ours: dict, theirs: dict) -> set[str]:
    """Our fused tensors equal PEFT's where PEFT's module names them as the checkpoint
    does (an MoE module fuses its experts, a tied head has one name); the others must be
    the base's own (an adapter on attention leaves them alone). The names that changed."""
    base = fam.weights("a")
    assert ours.keys() == base.keys()
    for name, value in ours.items():
        expected = theirs[name] if name in theirs else base[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
    return {name for name in ours if not torch.equal(ours[name], base[name])}


def attach_oracle(fam: Family, out: Path, manifest: dict) -> None:
    theirs = peft_fused(fam, "adapter").merge_and_unload().state_dict()
    assert fused_equal(fam, tensors(out), theirs)
    layer_count_matches(fam, out)


def combine_oracle(fam: Family, out: Path, manifest: dict) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    model = peft_fused(fam, "adapter", "adapter2")
    model.add_weighted_adapter(["first", "more0"], [0.7, -0.4], "m", combination_type="linear")
    theirs = get_peft_model_state_dict(model, adapter_name="m")
    ours = load_file(out / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def trained_oracle(fam: Family, out: Path, manifest: dict) -> None:
    """PEFT loads the trained adapter onto the base; it changes the family's attention
    projections and only those."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(fam.root / "a"), out)
    fused = model.merge_and_unload().state_dict()
    base = fam.weights("a")
    changed = {name.rsplit(".", 2)[-2] for name in base if name in fused and not torch.allclose(fused[name], base[name])}
    assert changed and changed <= set(fam.case.lora), changed


def extract_oracle(fam: Family, out: Path, manifest: dict) -> None:
    """PEFT's fused model adds, to every targeted weight, the rank-2 truncated SVD of b - a."""
    fused = peft_fused_dir(fam, out).merge_and_unload().state_dict()
    a, b = fam.weights("a"), fam.weights("b")
    changed = 0
    for name, value in a.items():
        if name not in fused or torch.equal(fused[name], value):
            continue
        u, s, vh = torch.linalg.svd((b[name] - value).double(), full_matrices=False)
        best = value.double() + (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(fused[name].double(), best, rtol=1e-4, atol=1e-5, msg=name)
        changed += 1
    assert changed


def peft_fused_dir(fam: Family, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load(fam.root / "a"), adapter)


def routed_oracle(fam: Family, out: Path, manifest: dict) -> None:
    """k = E: the routed model runs every expert, i.e. the dense FFN."""
    routed = cfmlang.load(out)
    with torch.no_grad():
        difference = (routed(IDS).logits - logits_of(load(fam.root / "a"))).abs().max().item()
    assert difference <= 1e-4, difference


def edit_oracle(fam: Family, out: Path, manifest: dict) -> None:
    summary = manifest["nodes"]["x"]["report"]["summary"]
    assert summary["probability_after"] > summary["probability_before"], summary
    before, after = fam.weights("a"), tensors(out)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == set(manifest["nodes"]["x"]["edited"]) and {fam.layer_of(n) for n in changed} <= {1, 2}, changed
    layer_count_matches(fam, out)


def finetune_oracle(fam: Family, out: Path, manifest: dict) -> None:
    before, after = fam.weights("a"), tensors(out)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and {fam.layer_of(n) for n in changed} == {1}, changed
    layer_count_matches(fam, out)


def lowered_oracle(fam: Family, out: Path, manifest: dict) -> None:
    lowered, eager = cfmlang.load(out), load(fam.root / "a")
    with torch.inference_mode():
        logits, cache = lowered.prefill(IDS[:, :5], 8)
        reference = eager(IDS).logits
        assert (logits - reference[:, :5]).abs().max() < 1e-4
        logits, cache = lowered.decode(IDS[:, 5], 5, cache)
        assert (logits[:, 0] - reference[:, 5]).abs().max() < 1e-4


# ---- the cells -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One operation: its statements (defining `x`), the doc column it belongs to, the
    diagnostics it may legitimately end in, and its oracle."""
    name: str
    column: str
    brick: str
    oracle: Callable[[Family, Path, dict], None]
    allowed: tuple[str, ...] = ()
    target: str = "eager"


EDIT = ("  steps: 4\n  covariance: identity\n  clamp_norm: 1000\n  weight_decay: 0\n  facts:\n"
        f'    - {{prompt: "{FACT["prompt"]}", subject: "{FACT["subject"]}", target: "{FACT["target"]}"}}\n')
TWINS = ('grow x:\n  method: moe\n  base: a\n  inputs:\n    a: {positive_prompts: ["the sea"]}\n'
         '    a2: {positive_prompts: ["a poem"]}\n  gate_mode: hidden\n')
CELLS = [
    *(Cell(f"merge {m.method}", "merge", merge_brick(m), merge_oracle(m)) for m in MERGES),
    Cell("stack", "stack", "grow x:\n  method: stack\n  slices: [a.layers[0:2], b.layers[1:3]]\n", stack_oracle),
    Cell("block_expand", "block_expand", "grow x:\n  method: block_expand\n  from: a\n  every: 2\n", identity_oracle),
    Cell("widen", "widen", "grow x:\n  method: widen\n  from: a\n  intermediate_size: 200\n", identity_oracle,
         ("E113",)),
    Cell("upcycle", "upcycle", "grow x:\n  method: upcycle\n  from: a\n  experts: 2\n", identity_oracle, ("E113",)),
    Cell("moe", "moe", 'model a2:\n  source: hf "a"\n' + TWINS, identity_oracle, ("E113",)),
    Cell("lora source", "lora source", LORA + "brick x:\n  kind: lora\n  source: peft \"adapter\"\n  base: a\n",
         source_oracle, ("E280",)),
    Cell("lora train", "lora train", "brick x:\n  kind: lora\n  base: a\n"
         '  train: {data: "train.txt", steps: 3, rank: 2, lr: 0.05, seed: 1, batch_size: 2}\n', trained_oracle,
         ("E280",)),
    Cell("lora extract", "lora extract", "brick x:\n  kind: lora\n  extract: {from: b, base: a, rank: 2}\n",
         extract_oracle, ("E280",)),
    Cell("attach", "attach", LORA + "model x:\n  from: a\n  attach: [l]\n", attach_oracle, ("E280",)),
    Cell("lora combine", "lora combine", LORA + LORA2 + "merge x:\n  method: linear\n"
         "  inputs: {l: {weight: 0.7}, l2: {weight: -0.4}}\n", combine_oracle, ("E280",)),
    Cell("experts topk", "experts, topk", "brick e:\n  kind: experts\n  from: a.layers[*].mlp\n  split: random\n"
         "  count: 2\n  seed: 0\nroute x:\n  method: topk\n  experts: e\n  router: similarity\n  k: 2\n",
         routed_oracle, ("E165",)),
    Cell("rome", "rome", "update x:\n  method: rome\n  from: a\n  layer: 1\n" + EDIT, edit_oracle, ("E113",)),
    Cell("memit", "memit", "update x:\n  method: memit\n  from: a\n  layers: [1, 2]\n" + EDIT, edit_oracle,
         ("E113",)),
    Cell("finetune", "finetune", 'update x:\n  method: finetune\n  from: a\n  train: a.layers[1]\n  data: "train.txt"\n'
         "  steps: 2\n  lr: 0.01\n", finetune_oracle),
    Cell("lowering", "export, inductor", "merge x:\n  method: passthrough\n  inputs: [a]\n", lowered_oracle,
         ("E173",), target="export"),
    Cell("lowering inductor", "export, inductor", "merge x:\n  method: passthrough\n  inputs: [a]\n",
         lowered_oracle, ("E173",), target="inductor"),
]
COLUMNS = list(dict.fromkeys(cell.column for cell in CELLS))


def run_cell(fam: Family, cell: Cell) -> str:
    """"yes" after the oracle passed, or the code of the documented diagnostic."""
    program = fam.root / (re.sub(r"\W", "_", cell.name) + ".brick")
    program.write_text(HEAD + cell.brick + "output: x\n")
    out = fam.root / f"out_{program.stem}"
    try:
        result = cfmlang.compile(program, out, cache_dir=fam.root / "cache", target=cell.target)
    except CompileError as exc:
        error = next(d for d in exc.diagnostics if d.is_error)
        assert error.code in cell.allowed, f"{fam.case.family} {cell.name}: {error.code} {error.message}"
        assert error.span is not None or cell.target != "eager", f"{error.code} is not located"
        assert fam.case.family in error.message or fam.config["model_type"] in error.message, error.message
        assert not out.exists(), "a refused cell left output behind"
        return error.code
    cell.oracle(fam, out, result.manifest)
    return "yes"


RESULTS: dict[str, dict[str, str]] = {}


def family_results(case: Case, root: Path) -> dict[str, str]:
    if case.family not in RESULTS:
        fam = make_family(case, root)
        RESULTS[case.family] = {cell.name: run_cell(fam, cell) for cell in CELLS}
    return RESULTS[case.family]


AVAILABLE = [c for c in CASES if getattr(transformers, c.config, None) is not None]


@pytest.mark.parametrize("case", AVAILABLE, ids=[c.family for c in AVAILABLE])
def test_every_operation_on_the_family(case, tmp_path_factory):
    """Every cell passes its oracle or ends in its documented diagnostic, and the
    family's row of docs/architectures.md says so."""
    row = family_results(case, tmp_path_factory.mktemp(case.family))
    merges = [name for name in row if name.startswith("merge ")]
    assert all(row[name] == "yes" for name in merges + ["stack", "block_expand", "finetune"]), row
    assert documented_rows().get(case.family) == matrix_cells(row), REGENERATE


# ---- the support matrix in docs/architectures.md -------------------------------------------

MATRIX = REPO / "docs" / "architectures.md"


def matrix_cells(row: dict[str, str]) -> dict[str, str]:
    """A family's cells by doc column: `yes` when every cell of the column passed its
    oracle, else the diagnostic codes the column's cells end in."""
    columns = {}
    for column in COLUMNS:
        found = [row[cell.name] for cell in CELLS if cell.column == column]
        codes = sorted({value for value in found if value != "yes"})
        columns[column] = "yes" if not codes else ", ".join(codes)
    return columns


EXPLAINED = {
    "E113": "`upcycle` and `moe` write Mixtral, so they need a bias-free Llama/Mistral-style model; `widen` needs "
            "separate FFN input and output projections stored `[out, in]`; `rome` and `memit` a dense FFN down "
            "projection stored `[out, in]` (not MoE experts, not GPT-2's Conv1D)",
    "E165": "expert bricks need gated FFNs (separate gate, up and down projections) without biases",
    "E173": "lowering (`--target export|inductor|tensorrt`, at compile time) restates Llama-style blocks: "
            "separate q/k/v/o projections with rotary positions (and Qwen3's per-head q/k norms), pre-norms, "
            "a sequential FFN",
    "E280": "LoRA bricks need linear projections stored `[out, in]`; GPT-2's Conv1D stores them transposed",
}
"""What each diagnostic of the matrix means (docs/diagnostics.md has the full text)."""


def matrix_markdown(rows: dict[str, dict[str, str]]) -> str:
    lines = ["# Supported architectures", "",
             "Each operation compiled on tiny random models of every decoder family the installed "
             "transformers has (tests/compiler/test_family_matrix.py, which also regenerates this page "
             "with `CFM_WRITE_DOCS=1`; a test keeps it equal to what the code does). `yes`: compiled, "
             "and the output equals an oracle that is not cfmlang's code: mergekit's tensor function of "
             f"each of the {len(MERGES)} merge methods (with a layer gradient and a tensor-name filter), "
             "the function of the input for function-preserving grow methods, PEFT for LoRA bricks, the "
             "dense model for a top-k route with k = E, the edit report for `rome`/`memit`, eager "
             "logits within 1e-4 for the exported and the inductor programs (`tensorrt` compiles the "
             "same exported decoder). Every written model holds as many layers as its config states. "
             "Otherwise the cell is the diagnostic the user gets, naming the family and what it lacks "
             "(from `cfmc check`, at the statement, except lowering's):", ""]
    codes = sorted({code for row in rows.values() for value in matrix_cells(row).values()
                    for code in value.split(", ") if code != "yes"})
    lines += [f"- {code}: {EXPLAINED[code]}" for code in codes]
    lines += ["", "| family | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for family in sorted(rows):
        cells = matrix_cells(rows[family])
        lines.append(f"| {family} | " + " | ".join(cells[c] for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


REGENERATE = "regenerate: CFM_WRITE_DOCS=1 pytest tests/compiler/test_family_matrix.py"


def documented_rows() -> dict[str, dict[str, str]]:
    """The family rows of docs/architectures.md, by column."""
    rows = {}
    for line in MATRIX.read_text().splitlines():
        parts = [part.strip() for part in line.strip().strip("|").split("|")]
        if line.startswith("| ") and parts[0] not in ("family", "---") and len(parts) == len(COLUMNS) + 1:
            rows[parts[0]] = dict(zip(COLUMNS, parts[1:]))
    return rows


def test_docs_matrix_is_what_the_code_does(tmp_path_factory):
    """The page is the generated text: its rows are checked against the compiled cells
    by each family's test above; here its families, legend and layout are. With
    CFM_WRITE_DOCS=1 every family is compiled and the page written."""
    if os.environ.get("CFM_WRITE_DOCS") == "1":
        rows = {case.family: family_results(case, tmp_path_factory.mktemp(case.family)) for case in AVAILABLE}
        MATRIX.write_text(matrix_markdown(rows))
    documented = documented_rows()
    assert sorted(documented) == sorted(case.family for case in AVAILABLE), REGENERATE
    as_cells = {family: {cell.name: columns[cell.column] for cell in CELLS} for family, columns in documented.items()}
    assert MATRIX.read_text() == matrix_markdown(as_cells), REGENERATE


def test_a_family_cfmlang_cannot_describe_merges_but_refuses_what_needs_its_layers(tmp_path):
    """A config transformers does not know: merges without gradients work, a gradient or
    a grow that needs the layers stops with E056 at the statement, naming the family."""
    from cfmlang.diagnostics import CompileError
    from models import tiny_model

    for name, seed in (("a", 1), ("b", 2)):
        folder = tiny_model(tmp_path / name, seed=seed)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "mystery_lm"}))
    head = 'model a:\n  source: hf "a"\nmodel b:\n  source: hf "b"\n'
    plain = tmp_path / "plain.brick"
    plain.write_text(head + "merge m:\n  method: linear\n  inputs: [a, b]\n  weight: 0.5\noutput: m\n")
    merged = tensors(cfmlang.compile(plain, tmp_path / "out").output_dir)
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.allclose(v, (a[k] + b[k]) / 2) for k, v in merged.items())
    for body, line in (("merge m:\n  method: linear\n  inputs:\n    a: {weight: [0.1, 0.9]}\n    b: {weight: 0.5}\n", 5),
                       ("grow m:\n  method: block_expand\n  from: a\n  every: 2\n", 6)):   # the method
        program = tmp_path / "layers.brick"
        program.write_text(head + body + "output: m\n")
        with pytest.raises(CompileError) as info:
            cfmlang.check(program)
        found = [d for d in info.value.diagnostics if d.code == "E056"]
        assert found and "mystery_lm" in found[0].message and found[0].span.line == line


def test_check_names_the_family_of_every_source_model(tmp_path, capsys):
    from cfmlang.cli import main

    by_family = {case.family: case for case in AVAILABLE}
    for name, family in (("a", "gpt2"), ("b", "qwen3"), ("c", "gpt2")):
        save_model(by_family[family], tmp_path / name, seed=1)
    (tmp_path / "p.brick").write_text(HEAD + "merge m:\n  method: linear\n  inputs: [a, c]\n  weight: 0.5\n"
                                      "output: m\n")
    assert main(["check", str(tmp_path / "p.brick")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert f"model a: gpt2 (transformers GPT2LMHeadModel), {LAYERS} layers" in lines
    assert f"model b: qwen3 (transformers Qwen3ForCausalLM), {LAYERS} layers" in lines
    assert lines[-1].endswith("p.brick: ok (4 nodes)")
