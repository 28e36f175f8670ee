"""The registry of operation methods and brick kinds.

Each entry is a small class with a pydantic parameter model. A method is found by its
statement keyword and name (`merge`/`linear`, `grow`/`block_expand`, `brick`/`lora` ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Union

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError, core_schema

Curve = Union[float, Annotated[list[float], Field(min_length=1)]]
Gradient = Union[Curve, Annotated[dict[str, Curve], Field(min_length=1)]]
"""A number; a list of numbers interpolated across layers (mergekit's gradients); or a
map of tensor-name filters to such values, `{self_attn: 0.3, mlp: [0, 1], default: 0.5}`:
the first key found in the tensor's name applies, `default` when none is."""
FILTER_DEFAULT = "default"


@dataclass(frozen=True)
class Range:
    """The numbers a parameter accepts, declared on its annotation:
    `density: Annotated[Gradient, Range(0, 1)]`. Checked on every number of the value (each
    point of a gradient, each entry of a filter map); `cfmc methods` shows it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, number: float) -> bool:
        above = self.low is None or (number > self.low if self.low_open else number >= self.low)
        below = self.high is None or (number < self.high if self.high_open else number <= self.high)
        return above and below

    def text(self) -> str:
        """`in [0, 1]`, `in (0, 1]`, `≥ 0`, `> 0` ..."""
        if self.high is None:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '≤'} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, value):
        for number in numbers_in(value):
            if not self.admits(number):
                raise PydanticCustomError("out_of_range", "{number} is not {range}",
                                          {"number": f"{number:g}", "range": self.text()})
        return value

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_after_validator_function(self.check, handler(source))


def numbers_in(value) -> list[float]:
    """Every number of a parameter value: itself, a gradient's points, a filter map's."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [n for item in value for n in numbers_in(item)]
    return []


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
