"""A GGUF file's metadata, read once per version of the file.

Opening a file with gguf's `GGUFReader` walks every metadata array (SmolLM2's 49k-token
vocabulary: about 2.5 s of CPU), and the checker (the architecture), the model card
(`general.*`) and chat templates each need a few fields. `gguf_header` reads the file
once per version (`filecache`) and keeps what they use: each field's type, its number of
values and, for a field that is not an array, its value; the tensors' names and shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from cfmlang.io.filecache import per_file_version


@dataclass(frozen=True)
class GGUFField:
    type: str                                   # GGUFValueType name: STRING, UINT32, ..., ARRAY
    count: int                                  # 1, or an array's length
    value: bytes | int | float | bool | None    # a string's bytes or a number; None for an array


@dataclass(frozen=True)
class GGUFHeader:
    fields: Mapping[str, GGUFField]
    tensors: tuple[tuple[str, tuple[int, ...]], ...]    # name and shape as the file lists it

    def string(self, key: str, errors: str = "strict") -> str | None:
        """A string field's text (None when the file has no such string field)."""
        field = self.fields.get(key)
        if field is None or field.type != "STRING":
            return None
        return field.value.decode("utf-8", errors=errors)


@per_file_version(maxsize=8)
def gguf_header(path: Path) -> GGUFHeader:
    """The metadata of the GGUF file at `path`; gguf's own errors (ValueError, KeyError
    and others on a file that is not GGUF) are raised for the caller to report."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {key: _field(field) for key, field in reader.fields.items()}
    tensors = tuple((tensor.name, tuple(int(d) for d in tensor.shape.tolist())) for tensor in reader.tensors)
    return GGUFHeader(MappingProxyType(fields), tensors)


def _field(field) -> GGUFField:
    kind = field.types[0].name if field.types else "UNKNOWN"
    if kind == "ARRAY" or not field.data:
        return GGUFField(kind, len(field.data), None)
    part = field.parts[field.data[0]]
    value = bytes(part) if kind == "STRING" else part[0].item()
    return GGUFField(kind, 1, value)
