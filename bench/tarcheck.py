"""Per-file verification of tar layers against a plain sha256 pass over the same bytes.

``python -m bench.tarcheck [--size 4G] [--reps 3] [--smoke] [--out DIR]``

Two layers of ``--size`` bytes of tar content, built in memory from one random
``--unit`` (64 MiB) so nothing touches the disk: a raw tar, and the same tar as
tar+gzip (one gzip member per header and per file body, the body compressed once and
repeated). Every file is listed in the plan with its sha256. Both are fed in 1 MiB
pieces, as the blob streamer does, to:

* ``sha256``: hashlib over the layer's bytes as stored (the digest check every blob
  gets anyway);
* ``tarcheck``: ``proxy.pipeline.tarcheck.TarCheck`` alone (decompress, parse, hash
  each file);
* ``streamed``: both at once, each piece hashed in one thread and checked in another,
  as ``proxy.pipeline.stream.hash_and_deliver`` runs them (wall time).

Figures are seconds per GiB of layer (medians of ``--reps``) and ratios to
``sha256``. The goal for raw tar is ``tarcheck`` <= 1.2x. Nothing asserts a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.pipeline.tarcheck import LayerPlan, TarCheck  # noqa: E402

MIB = 1024**2
GIB = 1024**3
PIECE = MIB


def _parse_size(text: str) -> int:
    units = {"K": 1024, "M": MIB, "G": GIB}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


class Layer:
    """A tar layer of ``count`` files, each ``unit - 512`` bytes of the same body."""

    def __init__(self, *, size: int, unit: int, gz: bool) -> None:
        self.count = max(1, size // unit)
        body = os.urandom(unit - tarfile.BLOCKSIZE)
        self.headers = []
        for i in range(self.count):
            info = tarfile.TarInfo(f"model/shard-{i:05d}.safetensors")
            info.size = len(body)
            self.headers.append(info.tobuf(tarfile.USTAR_FORMAT))
        self.end = bytes(2 * tarfile.BLOCKSIZE)
        digest = hashlib.sha256(body).hexdigest()
        self.files = tuple((f"model/shard-{i:05d}.safetensors", digest) for i in range(self.count))
        self.compression = "gzip" if gz else "none"
        if gz:
            self.body = _gzip(body)
            self.headers = [_gzip(h) for h in self.headers]
            self.end = _gzip(self.end)
        else:
            self.body = body
        self.size = sum(len(h) for h in self.headers) + self.count * len(self.body) + len(self.end)

    def plan(self) -> LayerPlan:
        return LayerPlan(compression=self.compression, files=self.files)

    def pieces(self) -> Iterator[memoryview]:
        """The layer's bytes as stored, bodies in 1 MiB pieces (headers on their own)."""
        view = memoryview(self.body)
        for header in self.headers:
            yield memoryview(header)
            for start in range(0, len(view), PIECE):
                yield view[start : start + PIECE]
        yield memoryview(self.end)


def _gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _timed(run: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(layer: Layer, reps: int) -> dict[str, dict[str, float]]:
    pool = ThreadPoolExecutor(2)

    def sha() -> None:
        hasher = hashlib.sha256()
        for piece in layer.pieces():
            hasher.update(piece)

    def check() -> None:
        tar = TarCheck(layer.plan())
        for piece in layer.pieces():
            tar.feed(piece)
        tar.finish()
        assert tar.files_checked == layer.count

    def streamed() -> None:
        hasher = hashlib.sha256()
        tar = TarCheck(layer.plan())
        for piece in layer.pieces():
            hashing = pool.submit(hasher.update, piece)
            checking = pool.submit(tar.feed, piece)
            hashing.result()
            checking.result()
        tar.finish()

    samples: dict[str, list[tuple[float, float]]] = {"sha256": [], "tarcheck": [], "streamed": []}
    runs = [("sha256", sha), ("tarcheck", check), ("streamed", streamed)]
    for rep in range(reps):
        for name, run in runs[rep % 3 :] + runs[: rep % 3]:  # rotate to cancel drift
            samples[name].append(_timed(run))
    pool.shutdown()
    gib = layer.size / GIB
    out: dict[str, dict[str, float]] = {}
    for name, values in samples.items():
        wall = statistics.median(v[0] for v in values) / gib
        cpu = statistics.median(v[1] for v in values) / gib
        out[name] = {"wall_s_per_gib": wall, "cpu_s_per_gib": cpu}
    base = out["sha256"]["wall_s_per_gib"]
    for name in out:
        out[name]["ratio_to_sha256"] = out[name]["wall_s_per_gib"] / base
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="4G")
    parser.add_argument("--unit", default="64M")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="64 MiB layers, one repetition")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    size, unit, reps = _parse_size(args.size), _parse_size(args.unit), args.reps
    if args.smoke:
        size, unit, reps = 64 * MIB, 8 * MIB, 1
    results: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "size": size,
        "reps": reps,
    }
    lines = [f"per-file tar check, {size / GIB:.2f} GiB layers, {reps} repetitions (medians)", ""]
    lines.append("| layer | pass | s/GiB wall | CPU s/GiB | x sha256 |")
    lines.append("|---|---|---|---|---|")
    for label, gz in (("raw tar", False), ("tar+gzip", True)):
        layer = Layer(size=size, unit=unit, gz=gz)
        figures = measure(layer, reps)
        results[label] = {"bytes": layer.size, **figures}
        for name, f in figures.items():
            lines.append(
                f"| {label} | {name} | {f['wall_s_per_gib']:.3f} | {f['cpu_s_per_gib']:.3f} "
                f"| {f['ratio_to_sha256']:.2f}x |"
            )
        del layer
    raw = results["raw tar"]
    assert isinstance(raw, dict)
    ratio = raw["tarcheck"]["ratio_to_sha256"]
    lines += ["", f"raw tar per-file check: {ratio:.2f}x sha256 (goal <= 1.2x: "
              f"{'met' if ratio <= 1.2 else 'missed'})"]  # fmt: skip
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tarcheck.json").write_text(json.dumps(results, indent=2))
    (args.out / "tarcheck.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
