"""Per-file checks inside a tar layer, as its bytes stream by.

A model layer packed as a tar (raw, gzip or zstd) holds files that a signature lists
one by one (OMS ``files`` serialization: path -> sha256). ``TarCheck`` takes the
layer's bytes in pieces, as the blob streamer moves them, decompresses them in
bounded chunks, parses the tar headers and hashes each regular file's content. It
keeps no file and no layer in memory: a header (512 bytes), a bounded PAX or GNU
long-name record and one output chunk of the decompressor at most.

Refused, each as ``TarRefused`` naming the file:

1. a member path that escapes the layer (``..`` or absolute), a duplicate path;
2. a member type other than file and directory (hard links, devices, sparse files),
   or a symlink the signature does not allow (allowed ones must point at a signed
   file with the same digest, inside the model; none may lie under an ignore rule);
3. a file the signature does not list (after the ignore rules), or whose sha256 is
   not the signed one;
4. after the end: a signed file the layer was to hold but did not;
5. a decompression bomb: more than ``max_ratio`` times the compressed size (plus a
   small allowance), or more than ``max_bytes`` in all;
6. a malformed archive: bad header checksum, truncation, data after the end.

Pure: no IO, no asyncio. The plan (``LayerPlan``) is built by the OMS verifier from
a verified signature and the layer's descriptor.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

BLOCK = 512
# Output of the decompressor handed to the parser at a time.
OUT_CHUNK = 1024 * 1024
# Bounds on the records pullgate buffers whole: PAX extended headers and GNU long names.
MAX_PAX_BYTES = 1024 * 1024
MAX_LONG_NAME = 64 * 1024
MAX_PATH = 4096
# Decompressed bytes allowed beyond ``max_ratio`` times the compressed ones, so small
# archives (headers and zero padding compress very well) are not called bombs.
RATIO_ALLOWANCE = 8 * 1024 * 1024
DEFAULT_MAX_RATIO = 100
DEFAULT_MAX_BYTES = 2 * 1024**4

COMPRESSIONS = ("none", "gzip", "zstd")
_REGULAR = (b"0", b"\0", b"7")


class TarRefused(Exception):
    """A layer whose content is not what the signature says; names the file."""

    def __init__(self, reason: str, *, path: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path
        self.plan: LayerPlan | None = None
        """The plan the layer failed (set by ``LayerCheck``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerPlan:
    """What one tar layer must hold, according to a verified model signature."""

    compression: str
    files: tuple[tuple[str, str], ...]
    """(path, sha256 hex) of every signed file this layer is to hold."""
    ignore: tuple[str, ...] = ()
    """Paths (and directories) the signature's ignore rules leave out."""
    allow_symlinks: bool = False
    signed: tuple[tuple[str, str], ...] = ()
    """With symlinks allowed: every signed file of the model, for link targets."""
    max_ratio: int = DEFAULT_MAX_RATIO
    max_bytes: int = DEFAULT_MAX_BYTES
    source: str = ""
    """What the plan comes from, for reasons (e.g. the model and signer)."""

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {self.compression!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "compression": self.compression,
            "files": [list(f) for f in self.files],
            "ignore": list(self.ignore),
            "allowSymlinks": self.allow_symlinks,
            "signed": [list(f) for f in self.signed],
            "maxRatio": self.max_ratio,
            "maxBytes": self.max_bytes,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, doc: Any) -> LayerPlan:
        if not isinstance(doc, dict):
            raise ValueError("a layer plan is a JSON object")
        return cls(
            compression=str(doc["compression"]),
            files=tuple((str(p), str(d)) for p, d in doc["files"]),
            ignore=tuple(str(p) for p in doc.get("ignore", [])),
            allow_symlinks=bool(doc.get("allowSymlinks", False)),
            signed=tuple((str(p), str(d)) for p, d in doc.get("signed", [])),
            max_ratio=int(doc.get("maxRatio", DEFAULT_MAX_RATIO)),
            max_bytes=int(doc.get("maxBytes", DEFAULT_MAX_BYTES)),
            source=str(doc.get("source", "")),
        )

    def fingerprint(self) -> str:
        """A digest of everything that decides the check (not the ``source`` label)."""
        doc = self.to_json()
        del doc["source"]
        canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def ignored(path: str, ignore: tuple[str, ...]) -> bool:
    """``path`` is one of ``ignore`` or lies under one of them."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in ignore)


def normalize_member(name: str) -> str:
    """A tar member name as a model path (``./a/b/`` -> ``a/b``); refuses escapes."""
    if "\0" in name or len(name) > MAX_PATH:
        raise TarRefused(f"member name {name[:80]!r} is malformed", path=name[:120])
    if name.startswith("/"):
        raise TarRefused(f"member {name[:120]} has an absolute path", path=name[:120])
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise TarRefused(f"member {name[:120]} escapes the model with ..", path=name[:120])
    return "/".join(parts)


# ---- decompression, in bounded chunks --------------------------------------------------


class _Decoder(Protocol):
    def feed(self, data: memoryview, out: Callable[[memoryview], None]) -> None: ...
    def finish(self) -> None: ...


class _Raw:
    def feed(self, data: memoryview, out: Callable[[memoryview], None]) -> None:
        out(data)

    def finish(self) -> None:
        pass


class _Gzip:
    """gzip, one member after another (``cat a.gz b.gz`` is one gzip stream)."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._between = False  # after a member's end, before the next one's header

    def feed(self, data: memoryview, out: Callable[[memoryview], None]) -> None:
        pending: bytes | memoryview = data
        while pending:
            if self._between:
                self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._between = False
            try:
                chunk = self._z.decompress(pending, OUT_CHUNK)
            except zlib.error as exc:
                raise TarRefused(f"the gzip stream is corrupt ({exc})") from None
            if chunk:
                out(memoryview(chunk))
            if self._z.eof:
                pending = self._z.unused_data
                self._between = True
            else:
                pending = self._z.unconsumed_tail

    def finish(self) -> None:
        if not self._between:
            raise TarRefused("the gzip stream is truncated")


class _Zstd:
    """zstd frames, decoded through a writer that hands out bounded chunks."""

    def __init__(self) -> None:
        import zstandard

        self._out: Callable[[memoryview], None] | None = None
        self._error = zstandard.ZstdError
        sink: Any = self  # a writable sink is all zstandard needs of it
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            sink, write_size=OUT_CHUNK, write_return_read=True
        )

    def write(self, data: bytes) -> int:  # the zstandard writer's sink
        assert self._out is not None
        self._out(memoryview(data))
        return len(data)

    def feed(self, data: memoryview, out: Callable[[memoryview], None]) -> None:
        self._out = out
        try:
            self._writer.write(data)
        except self._error as exc:
            raise TarRefused(f"the zstd stream is corrupt ({exc})") from None

    def finish(self) -> None:
        # A cut zstd stream leaves a cut tar archive, which the parser refuses.
        pass


def _decoder(compression: str) -> _Decoder:
    if compression == "gzip":
        return _Gzip()
    if compression == "zstd":
        return _Zstd()
    return _Raw()


# ---- the tar parser ----------------------------------------------------------------------


def _octal(field_bytes: bytes, what: str) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # base-256 (GNU, for big sizes)
        value = int.from_bytes(field_bytes[1:], "big")
        return -value if field_bytes[0] & 0x40 else value
    text = field_bytes.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarRefused(f"tar header has a malformed {what}") from None


def _text(field_bytes: bytes) -> str:
    return field_bytes.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            raise TarRefused("a PAX header is malformed")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarRefused("a PAX header is malformed") from None
        if length <= space - pos or pos + length > len(data):
            raise TarRefused("a PAX header is malformed")
        record = data[space + 1 : pos + length - 1]
        key, sep, value = record.partition(b"=")
        if not sep:
            raise TarRefused("a PAX header is malformed")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


@dataclass(slots=True)
class _Member:
    kind: bytes
    remaining: int
    padding: int
    path: str = ""
    hasher: Any = None
    record: bytearray | None = None


class TarCheck:
    """Checks one tar layer against its ``LayerPlan`` as its bytes are fed in order.

    ``feed`` the layer's bytes (compressed as they are in the registry), then call
    ``finish``. Either raises ``TarRefused`` at the first problem; after that the
    check is spent.
    """

    def __init__(self, plan: LayerPlan) -> None:
        self._plan = plan
        self._expected = dict(plan.files)
        self._signed = dict(plan.signed) if plan.allow_symlinks else {}
        self._seen: set[str] = set()
        self._links: set[str] = set()
        self._decoder = _decoder(plan.compression)
        self._compressed = 0
        self._expanded = 0
        self._header = bytearray()
        self._member: _Member | None = None
        self._pending: dict[str, str] = {}  # from a PAX or GNU long-name record
        self._zero_blocks = 0
        self._ended = False
        self._failed: TarRefused | None = None
        self.files_checked = 0

    # -- input ---------------------------------------------------------------------

    def feed(self, data: memoryview | bytes) -> None:
        """The next bytes of the layer, as stored (no reference is kept to ``data``)."""
        if self._failed is not None:
            raise self._failed
        self._compressed += len(data)
        try:
            self._decoder.feed(memoryview(data), self._expand)
        except TarRefused as exc:
            self._failed = exc
            raise

    def finish(self) -> None:
        """The layer ended: everything fed must have been a whole, clean archive that
        held every file the plan expects."""
        if self._failed is not None:
            raise self._failed
        try:
            self._decoder.finish()
            self._finish_archive()
        except TarRefused as exc:
            self._failed = exc
            raise

    # -- bomb guards ---------------------------------------------------------------

    def _expand(self, data: memoryview) -> None:
        self._expanded += len(data)
        plan = self._plan
        if self._expanded > plan.max_bytes:
            raise TarRefused(
                f"the layer expands to more than {plan.max_bytes} bytes (decompression bomb)"
            )
        if (
            plan.compression != "none"
            and self._expanded > plan.max_ratio * self._compressed + RATIO_ALLOWANCE
        ):
            raise TarRefused(
                f"the layer expands to {self._expanded} bytes from {self._compressed} "
                f"compressed, over the {plan.max_ratio}x ratio (decompression bomb)"
            )
        self._parse(data)

    # -- tar -----------------------------------------------------------------------

    def _parse(self, data: memoryview) -> None:
        pos, end = 0, len(data)
        while pos < end:
            member = self._member
            if self._ended:
                if any(data[pos:end]):
                    raise TarRefused("the layer has data after the end of the archive")
                return
            if member is not None:
                take = min(member.remaining, end - pos)
                if take:
                    piece = data[pos : pos + take]
                    if member.hasher is not None:
                        member.hasher.update(piece)
                    elif member.record is not None:
                        member.record += piece
                    member.remaining -= take
                    pos += take
                if member.remaining == 0:
                    skip = min(member.padding, end - pos)
                    member.padding -= skip
                    pos += skip
                    if member.padding == 0:
                        self._member = None
                        self._member_done(member)
                continue
            take = min(BLOCK - len(self._header), end - pos)
            self._header += data[pos : pos + take]
            pos += take
            if len(self._header) == BLOCK:
                header = bytes(self._header)
                self._header.clear()
                self._on_header(header)

    def _on_header(self, header: bytes) -> None:
        if not any(header):
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self._ended = True
            return
        if self._zero_blocks:
            raise TarRefused("the archive has a member after an end-of-archive block")
        stored = _octal(header[148:156], "checksum")
        unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
        signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b > 127)
        if stored not in (unsigned, signed):
            raise TarRefused("a tar header checksum does not match (not a tar archive?)")
        kind = header[156:157]
        size = _octal(header[124:136], "size")
        if size < 0:
            raise TarRefused("a tar header has a negative size")
        padding = -size % BLOCK
        if kind in (b"x", b"g", b"L", b"K"):
            cap = MAX_PAX_BYTES if kind in (b"x", b"g") else MAX_LONG_NAME
            if size > cap:
                raise TarRefused(f"a tar metadata record of {size} bytes exceeds {cap}")
            self._member = _Member(kind, size, padding, record=bytearray())
            if size == 0 and padding == 0:
                member, self._member = self._member, None
                self._member_done(member)
            return
        name = _text(header[0:100])
        if header[257:263] == b"ustar\0":  # POSIX ustar: a prefix may hold the dirs
            prefix = _text(header[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        linkname = _text(header[157:257])
        name = self._pending.pop("path", name)
        linkname = self._pending.pop("linkpath", linkname)
        if "size" in self._pending:
            try:
                size = int(self._pending.pop("size"))
            except ValueError:
                raise TarRefused("a PAX size is malformed") from None
            padding = -size % BLOCK
        self._pending.clear()
        path = normalize_member(name)
        self._check_parents(path)
        member = _Member(kind, size, padding, path=path)
        if kind in _REGULAR:
            self._start_file(member)
        elif kind == b"5":
            pass
        elif kind == b"2":
            self._symlink(path, linkname)
        elif kind == b"1":
            raise TarRefused(f"member {path[:120]} is a hard link (not allowed)", path=path)
        else:
            shown = kind.decode("latin-1") or "?"
            raise TarRefused(
                f"member {path[:120]} has tar type {shown!r} (only files and directories)",
                path=path,
            )
        if size == 0 and padding == 0:
            self._member_done(member)
        else:
            self._member = member

    def _check_parents(self, path: str) -> None:
        """No member may lie under a symlink (writing through it would escape)."""
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in self._links:
                raise TarRefused(f"member {path[:120]} lies under symlink {parent}", path=path)

    def _start_file(self, member: _Member) -> None:
        path = member.path
        if not path:
            raise TarRefused("a file member has an empty name")
        if path in self._seen:
            raise TarRefused(f"file {path[:120]} appears twice in the layer", path=path)
        self._seen.add(path)
        if ignored(path, self._plan.ignore):
            return  # consumed unhashed
        if path not in self._expected:
            raise TarRefused(f"file {path[:120]} is not covered by the signature", path=path)
        member.hasher = hashlib.sha256()

    def _symlink(self, path: str, target: str) -> None:
        if path in self._seen:
            raise TarRefused(f"file {path[:120]} appears twice in the layer", path=path)
        self._seen.add(path)
        self._links.add(path)
        if ignored(path, self._plan.ignore):
            # Unsigned, yet it redirects every later write under its name (an ignored
            # raw layer, another tar layer): out of the model or over a signed file.
            raise TarRefused(
                f"member {path[:120]} is a symlink under an ignore rule (nothing signed "
                "says where it may point)",
                path=path,
            )
        if not self._plan.allow_symlinks:
            raise TarRefused(
                f"member {path[:120]} is a symlink; the signature does not allow symlinks",
                path=path,
            )
        if target.startswith("/"):
            raise TarRefused(f"symlink {path[:120]} points to an absolute path", path=path)
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        if resolved == ".." or resolved.startswith("../"):
            raise TarRefused(f"symlink {path[:120]} points outside the model", path=path)
        wanted = self._expected.get(path)
        if wanted is None:
            raise TarRefused(f"file {path[:120]} is not covered by the signature", path=path)
        if self._signed.get(resolved) != wanted:
            raise TarRefused(
                f"symlink {path[:120]} points to {resolved[:120]}, not a signed file "
                "with the digest signed for the link",
                path=path,
            )
        self.files_checked += 1

    def _member_done(self, member: _Member) -> None:
        if member.record is not None:
            record = bytes(member.record)
            if member.kind == b"x":
                self._pending.update(_pax_records(record))
            elif member.kind == b"g":
                if {"path", "linkpath"} & set(_pax_records(record)):
                    raise TarRefused("a global PAX header sets member paths")
            elif member.kind == b"L":
                self._pending["path"] = record.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                self._pending["linkpath"] = record.split(b"\0", 1)[0].decode(
                    "utf-8", "surrogateescape"
                )
            return
        if member.hasher is None:
            return
        actual = member.hasher.hexdigest()
        wanted = self._expected[member.path]
        if actual != wanted:
            raise TarRefused(
                f"file {member.path[:120]} has digest sha256:{actual}, signed sha256:{wanted}",
                path=member.path,
            )
        self.files_checked += 1

    def _finish_archive(self) -> None:
        if self._member is not None or self._header:
            where = f" inside {self._member.path[:120]}" if self._member else ""
            raise TarRefused(f"the archive is truncated{where}")
        if self._zero_blocks == 0 and self._expanded:
            raise TarRefused("the archive is truncated (no end-of-archive marker)")
        for path in sorted(self._expected):
            if path not in self._seen:
                raise TarRefused(f"signed file {path[:120]} is missing from the layer", path=path)


class LayerCheck:
    """Every plan of one layer over the same bytes (two models may share a layer: it
    must hold what each signature says). A refusal names the plan it failed."""

    def __init__(self, plans: Sequence[LayerPlan]) -> None:
        self._checks = [(plan, TarCheck(plan)) for plan in plans]

    def feed(self, data: memoryview | bytes) -> None:
        for plan, check in self._checks:
            try:
                check.feed(data)
            except TarRefused as exc:
                exc.plan = plan
                raise

    def finish(self) -> None:
        for plan, check in self._checks:
            try:
                check.finish()
            except TarRefused as exc:
                exc.plan = plan
                raise


def check_bytes(plan: LayerPlan, data: bytes, *, piece: int = 1024 * 1024) -> int:
    """Check a whole layer held in memory (tests and tools); the files checked."""
    check = TarCheck(plan)
    view = memoryview(data)
    for start in range(0, len(view), piece):
        check.feed(view[start : start + piece])
    check.finish()
    return check.files_checked
