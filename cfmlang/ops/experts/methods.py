"""Expert bricks (FFN neuron partitions) and top-k routing over them."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from cfmlang.ops.experts.routers import ROUTER_BUILDERS
from cfmlang.ops.registry import Method, Params, register

SPLITS = ("kmeans", "cooccurrence", "functional", "random")


def registered_router(name: str) -> str:
    """A router name registered with `register_router` (similarity, mlp, quantized, oracle ...)."""
    if name not in ROUTER_BUILDERS:
        raise ValueError(f"unknown router `{name}`; routers: {', '.join(ROUTER_BUILDERS)}")
    return name


RouterName = Annotated[str, AfterValidator(registered_router)]
CALIBRATED_SPLITS = ("cooccurrence", "functional")


class GeneratedCalibration(Params):
    """`calibration: {generate: N}`: the model writes N tokens of its own (seeded)."""

    generate: Annotated[int, Field(ge=64)]


class CalibrationOptions(Params):
    calibration: str | GeneratedCalibration | None = None
    """A UTF-8 text file (relative to the .brick file), `probes` (the shipped probe
    prompts of `cfmc analyze` as text) or `{generate: N}`; default: the shipped corpus.
    For `split: functional`, a directory of probe prompts (one ABILITY.txt per ability,
    as for `cfmc analyze`); default: the shipped probe sets."""
    calibration_tokens: Annotated[int, Field(ge=64)] = 4096
    seed: Annotated[int, Field(ge=0)] | None = None


@register
class ExpertsBrick(Method):
    keyword = "brick"
    name = "experts"
    summary = ("FFN neurons of `from: m.layers[*].mlp` split into `count` equal experts "
               "(`split`: kmeans, cooccurrence on calibration text, functional by FuncScore on "
               "probe prompts, random)")

    class Options(CalibrationOptions):
        split: Literal[SPLITS]
        count: Annotated[int, Field(ge=2)]


@register
class TopkRoute(Method):
    keyword = "route"
    name = "topk"
    summary = ("run only the `k` experts of `experts:` its `router` picks per token (similarity, "
               "mlp, quantized, oracle, and any router a module registers with `register_router`)")

    class Options(CalibrationOptions):
        k: Annotated[int, Field(ge=1)]
        router: RouterName = "mlp"
        epochs: Annotated[int, Field(ge=1)] = 30
