"""The metadata of a GGUF file: its key/value pairs and tensor names, read from the header only.

gguf's GGUFReader builds a numpy view for every string of every array while it opens a file:
for the built-in model's 49,152-token vocabulary and its merges that is 1.7 s on a 2-core
machine, most of `plan`'s 2-second budget, for values plan never reads. This reader walks the
same header with gguf's own type codes, keeps scalars and strings, and for arrays keeps only
their length (the vocabulary size), except the arrays asked for by name (the tokenizer's, when plan
builds it from the file). Nothing past the header is touched.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGUF_MAGIC, GGUFValueType

from tuneforge.errors import ModelError

_SCALARS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


@dataclass
class GGUFHeader:
    """Scalar and string metadata by key; arrays as their length (those asked for in full); the names of the tensors."""

    fields: dict[str, object] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    arrays: dict[str, list] = field(default_factory=dict)
    tensors: list[str] = field(default_factory=list)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise self._truncated() from None
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def _truncated(self) -> ModelError:
        return ModelError(f"base_model: {self.path} ends inside its GGUF header; the file is truncated")

    def strings(self, count: int, keep: bool = True) -> list[str]:
        """`count` strings, decoded when kept (walked in one loop: the vocabulary has ~50k-150k)."""
        out, buf, pos, unpack = [], self.buf, self.pos, struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                if keep:
                    out.append(bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8", errors="replace"))
                pos += 8 + n
        except struct.error:
            raise self._truncated() from None
        self.pos = pos
        return out

    def values(self, vtype: int, count: int) -> list:
        """An array of strings or numbers, read in full."""
        if vtype == GGUFValueType.STRING:
            return self.strings(count)
        fmt = f"<{count}{_SCALARS[GGUFValueType(vtype)]}"
        try:
            out = list(struct.unpack_from(fmt, self.buf, self.pos))
        except struct.error:
            raise self._truncated() from None
        self.pos += struct.calcsize(fmt)
        return out

    def skip(self, vtype: int, count: int) -> None:
        if vtype == GGUFValueType.STRING:
            self.strings(count, keep=False)
        elif vtype == GGUFValueType.ARRAY:
            for _ in range(count):
                self.skip(self.take("I"), self.take("Q"))
        else:
            self.pos += struct.calcsize("<" + _SCALARS[GGUFValueType(vtype)]) * count


def read_gguf_header(path: str | Path, arrays: tuple[str, ...] = ()) -> GGUFHeader:
    """The header of a GGUF file (version 2 or 3), with the arrays named in `arrays` read in full."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ModelError(f"base_model: {path} is empty, not a GGUF file") from None
    with buf:
        cur = _Cursor(buf, path)
        if len(buf) < 24 or cur.take("I") != GGUF_MAGIC:
            raise ModelError(f"base_model: {path} is not a GGUF file (no GGUF magic at its start)")
        version = cur.take("I")
        if version not in (2, 3):
            raise ModelError(f"base_model: {path} is GGUF version {version}; plan reads versions 2 and 3")
        n_tensors, n_fields = cur.take("Q"), cur.take("Q")
        header = GGUFHeader()
        for _ in range(n_fields):
            key, vtype = cur.string(), cur.take("I")
            if vtype == GGUFValueType.STRING:
                header.fields[key] = cur.string()
            elif vtype == GGUFValueType.ARRAY:
                item, count = cur.take("I"), cur.take("Q")
                header.array_lengths[key] = count
                if key in arrays and item != GGUFValueType.ARRAY:
                    header.arrays[key] = cur.values(item, count)
                else:
                    cur.skip(item, count)
            elif vtype in _SCALARS:
                header.fields[key] = cur.take(_SCALARS[GGUFValueType(vtype)])
            else:
                raise ModelError(f"base_model: {path}: metadata {key} has unknown GGUF type {vtype}")
        for _ in range(n_tensors):
            header.tensors.append(cur.string())
            n_dims = cur.take("I")
            cur.pos += 8 * n_dims + 4 + 8  # dims, type, offset
        return header
