"""A strict, bounded CBOR (RFC 8949) decoder and a small encoder, enough for COSE_Sign1.

Hostile input is the norm here: lengths are checked against the bytes actually
present before anything is allocated, nesting depth and item counts are capped,
indefinite lengths are refused, and trailing bytes are an error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 16
MAX_ITEMS = 4096


class CBORError(ValueError):
    """Input that is not well-formed CBOR within pullgate's limits."""


@dataclass(frozen=True, slots=True)
class Tagged:
    tag: int
    value: Any


def decode(data: bytes) -> Any:
    """Decode exactly one CBOR item spanning all of ``data``."""
    decoder = _Decoder(data)
    value = decoder.item(0)
    if decoder.pos != len(data):
        raise CBORError(f"{len(data) - decoder.pos} trailing bytes after the CBOR item")
    return value


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.items = 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise CBORError("CBOR item runs past the end of the input")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def argument(self, info: int) -> int:
        if info < 24:
            return info
        if info == 24:
            return self.take(1)[0]
        if info == 25:
            return int(struct.unpack(">H", self.take(2))[0])
        if info == 26:
            return int(struct.unpack(">I", self.take(4))[0])
        if info == 27:
            return int(struct.unpack(">Q", self.take(8))[0])
        raise CBORError("indefinite or reserved lengths are not accepted")

    def item(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CBORError("CBOR nesting is too deep")
        self.items += 1
        if self.items > MAX_ITEMS:
            raise CBORError("too many CBOR items")
        initial = self.take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            return self.simple(info)
        value = self.argument(info)
        if major == 0:
            return value
        if major == 1:
            return -1 - value
        if major == 2:
            return self.take(value)
        if major == 3:
            try:
                return self.take(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CBORError("text string is not UTF-8") from exc
        if major == 4:
            if value > len(self.data) - self.pos:
                raise CBORError("array longer than the input")
            return [self.item(depth + 1) for _ in range(value)]
        if major == 5:
            if value * 2 > len(self.data) - self.pos:
                raise CBORError("map longer than the input")
            out: dict[Any, Any] = {}
            for _ in range(value):
                key = self.item(depth + 1)
                # COSE keys are integers or text; anything else (arrays, maps, tagged
                # items that may hold them) is refused rather than hashed.
                if not isinstance(key, int | str | bytes) or isinstance(key, bool):
                    raise CBORError("map keys must be integers, text or bytes")
                if key in out:
                    raise CBORError(f"duplicate map key {key!r}")
                out[key] = self.item(depth + 1)
            return out
        return Tagged(value, self.item(depth + 1))  # major 6

    def simple(self, info: int) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info in (22, 23):
            return None
        if info == 25:
            import math

            half = struct.unpack(">e", self.take(2))[0]
            return None if math.isnan(half) else half
        if info == 26:
            return struct.unpack(">f", self.take(4))[0]
        if info == 27:
            return struct.unpack(">d", self.take(8))[0]
        raise CBORError(f"unsupported CBOR simple value {info}")


def encode(value: Any) -> bytes:
    """Deterministic-enough encoding for the values COSE needs (ints, bytes, text,
    arrays, maps, tags, bools, None)."""
    if value is True:
        return b"\xf5"
    if value is False:
        return b"\xf4"
    if value is None:
        return b"\xf6"
    if isinstance(value, int):
        return _head(0, value) if value >= 0 else _head(1, -1 - value)
    if isinstance(value, bytes):
        return _head(2, len(value)) + value
    if isinstance(value, str):
        raw = value.encode()
        return _head(3, len(raw)) + raw
    if isinstance(value, list | tuple):
        return _head(4, len(value)) + b"".join(encode(v) for v in value)
    if isinstance(value, dict):
        return _head(5, len(value)) + b"".join(encode(k) + encode(v) for k, v in value.items())
    if isinstance(value, Tagged):
        return _head(6, value.tag) + encode(value.value)
    raise TypeError(f"cannot encode {type(value).__name__} as CBOR")


def _head(major: int, argument: int) -> bytes:
    if argument < 24:
        return bytes([major << 5 | argument])
    if argument < 1 << 8:
        return bytes([major << 5 | 24, argument])
    if argument < 1 << 16:
        return bytes([major << 5 | 25]) + struct.pack(">H", argument)
    if argument < 1 << 32:
        return bytes([major << 5 | 26]) + struct.pack(">I", argument)
    return bytes([major << 5 | 27]) + struct.pack(">Q", argument)
