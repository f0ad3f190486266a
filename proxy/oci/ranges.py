"""Single-range ``Range`` header parsing (RFC 9110 byte ranges)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.oci.errors import RangeInvalid, RangeNotSatisfiable

_RANGE_RE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """An inclusive byte range ``[start, end]`` resolved against a known size."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Resolve a Range header against a blob of ``size`` bytes.

    Returns None for "no range" (serve the whole body). Multiple ranges are refused:
    registries are not multipart servers, and containerd never asks for them.
    """
    if header is None:
        return None
    text = header.strip()
    if "," in text:
        raise RangeInvalid("multiple byte ranges are not supported; ask for one range")
    match = _RANGE_RE.match(text)
    if match is None:
        raise RangeInvalid(
            f"malformed Range header {header[:80]!r}; expected bytes=N- or bytes=a-b"
        )
    first, last = match.group(1), match.group(2)
    if first == "" and last == "":
        raise RangeInvalid("Range header bytes=- names no bytes")
    if first == "":
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiable(
                f"suffix range of 0 bytes of a {size}-byte blob", detail={"size": size}
            )
        return (
            ByteRange(max(0, size - suffix), size - 1) if size > 0 else _unsatisfiable(header, size)
        )
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        raise RangeInvalid(f"Range {header[:80]!r} ends before it starts")
    if start >= size:
        return _unsatisfiable(header, size)
    if start == 0 and end == size - 1:
        return ByteRange(0, size - 1)
    return ByteRange(start, end)


def _unsatisfiable(header: str, size: int) -> ByteRange:
    raise RangeNotSatisfiable(
        f"Range {header[:80]!r} starts beyond the end of a {size}-byte blob",
        detail={"size": size},
    )
