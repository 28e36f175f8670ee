"""The registry of operation methods and brick kinds.

Each entry is a small class with a pydantic parameter model. A method is found by its
statement keyword and name (`merge`/`linear`, `grow`/`block_expand`, `brick`/`lora` ...).
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Union

from pydantic import BaseModel, ConfigDict, Field

Curve = Union[float, Annotated[list[float], Field(min_length=1)]]
Gradient = Union[Curve, Annotated[dict[str, Curve], Field(min_length=1)]]
"""A number; a list of numbers interpolated across layers (mergekit's gradients); or a
map of tensor-name filters to such values, `{self_attn: 0.3, mlp: [0, 1], default: 0.5}`:
the first key found in the tensor's name applies, `default` when none is."""
FILTER_DEFAULT = "default"


def filter_value(value, tensor_name: str):
    """The entry of a filter map that applies to `tensor_name` (first key contained in the
    name, else `default`); other values as they are."""
    if not isinstance(value, dict):
        return value
    for key, chosen in value.items():
        if key != FILTER_DEFAULT and key in tensor_name:
            return chosen
    return value.get(FILTER_DEFAULT)


def interpolate(value, t: float):
    """mergekit's gradient rule: a list of numbers is a piecewise-linear curve over t."""
    if not isinstance(value, list):
        return value
    if len(value) == 1:
        return value[0]
    scaled = t * (len(value) - 1)
    low = int(scaled)
    high = min(len(value) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * value[low] + frac * value[high]


def evaluate(value, tensor_name: str, t: float):
    """A parameter's value for one tensor at layer position t."""
    return interpolate(filter_value(value, tensor_name), t)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoParams(Params):
    pass


class Method:
    keyword: ClassVar[str]
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type[Params]] = NoParams


REGISTRY: dict[tuple[str, str], type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    key = (cls.keyword, cls.name)
    if key in REGISTRY:
        raise ValueError(f"{cls.keyword} method {cls.name!r} is registered twice")
    REGISTRY[key] = cls
    return cls


def lookup(keyword: str, name: str) -> type[Method] | None:
    return REGISTRY.get((keyword, name))


def names_for(keyword: str) -> list[str]:
    return sorted(name for kw, name in REGISTRY if kw == keyword)



def aliases(model: type[BaseModel]) -> list[str]:
    """The parameter names a user writes (a field's alias, else its name)."""
    return [f.alias or name for name, f in model.model_fields.items()]
