"""The streaming per-file check of tar layers (``proxy.pipeline.tarcheck``).

Archives are built by the tests with the standard library's ``tarfile`` (hostile ones
with hand-set member names and types); the check is fed in small pieces, as the blob
streamer would feed it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
import textwrap
import zlib

import pytest
import zstandard

from proxy.pipeline.tarcheck import LayerPlan, TarCheck, TarRefused, check_bytes

WEIGHTS = b"\x01\x02weights" * 1000
CONFIG = b'{"layers": 2}'


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_tar(
    members: list[tuple[tarfile.TarInfo, bytes | None]], *, fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return out.getvalue()


def file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def directory(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, None


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def model_tar(**extra: bytes) -> bytes:
    members = [
        directory("model"),
        file("model/weights.bin", WEIGHTS),
        file("model/config.json", CONFIG),
    ]
    members += [file(name, data) for name, data in extra.items()]
    return build_tar(members)


def plan(compression: str = "none", **overrides: object) -> LayerPlan:
    files = (("model/weights.bin", sha(WEIGHTS)), ("model/config.json", sha(CONFIG)))
    args: dict[str, object] = {"compression": compression, "files": files, "source": "test"}
    args.update(overrides)
    return LayerPlan(**args)  # type: ignore[arg-type]


def refused(p: LayerPlan, data: bytes, piece: int = 4096) -> TarRefused:
    with pytest.raises(TarRefused) as info:
        check_bytes(p, data, piece=piece)
    return info.value


# ---- what passes -------------------------------------------------------------------


@pytest.mark.parametrize("piece", [1, 511, 512, 4096, 1 << 20])
def test_accepts_signed_files_in_any_piece_size(piece: int) -> None:
    assert check_bytes(plan(), model_tar(), piece=piece) == 2


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_accepts_each_tar_format_with_long_names(fmt: int) -> None:
    long_dir = "model/" + "d" * 120
    name = f"{long_dir}/weights.bin" if fmt != tarfile.USTAR_FORMAT else "model/weights.bin"
    data = build_tar([file(name, WEIGHTS)], fmt=fmt)
    assert check_bytes(LayerPlan(compression="none", files=((name, sha(WEIGHTS)),)), data) == 1


def test_accepts_gzip_and_multi_member_gzip() -> None:
    raw = model_tar()
    assert check_bytes(plan("gzip"), gzip.compress(raw), piece=333) == 2
    half = len(raw) // 2
    two_members = gzip.compress(raw[:half]) + gzip.compress(raw[half:])
    assert check_bytes(plan("gzip"), two_members) == 2


def test_accepts_zstd() -> None:
    data = zstandard.ZstdCompressor().compress(model_tar())
    assert check_bytes(plan("zstd"), data, piece=100) == 2


def test_ignored_paths_are_not_required_or_refused() -> None:
    data = model_tar(**{"model/.gitattributes": b"*.bin lfs"})
    assert check_bytes(plan(ignore=("model/.gitattributes",)), data) == 2
    files = (("model/weights.bin", sha(WEIGHTS)),)
    assert check_bytes(plan(files=files, ignore=("model/config.json",)), model_tar()) == 1


def test_allowed_symlink_must_point_at_a_signed_file_with_its_digest() -> None:
    data = build_tar([file("model/weights.bin", WEIGHTS), link("model/alias.bin", "weights.bin")])
    signed = (("model/weights.bin", sha(WEIGHTS)), ("model/alias.bin", sha(WEIGHTS)))
    assert (
        check_bytes(
            LayerPlan(compression="none", files=signed, allow_symlinks=True, signed=signed), data
        )
        == 2
    )
    wrong = (("model/weights.bin", sha(WEIGHTS)), ("model/alias.bin", sha(CONFIG)))
    reason = refused(
        LayerPlan(compression="none", files=wrong, allow_symlinks=True, signed=wrong), data
    )
    assert reason.path == "model/alias.bin"


# ---- hostile archives --------------------------------------------------------------


def test_refuses_tar_member_escaping_with_dotdot() -> None:
    data = build_tar(
        [file("model/weights.bin", WEIGHTS), file("model/../../etc/cron.d/x", b"* * * * * root sh")]
    )
    err = refused(plan(), data)
    assert "escapes" in err.reason and "cron.d" in err.reason


def test_refuses_tar_member_with_absolute_path() -> None:
    err = refused(plan(), build_tar([file("/etc/passwd", b"root::0:0")]))
    assert "absolute" in err.reason and err.path == "/etc/passwd"


def test_refuses_symlink_the_signature_does_not_allow() -> None:
    data = build_tar([file("model/weights.bin", WEIGHTS), link("model/config.json", "/etc/shadow")])
    err = refused(plan(), data)
    assert err.path == "model/config.json" and "symlink" in err.reason


def test_refuses_symlink_pointing_outside_the_model_even_when_symlinks_are_allowed() -> None:
    signed = (("model/weights.bin", sha(WEIGHTS)),)
    data = build_tar(
        [file("model/weights.bin", WEIGHTS), link("model/weights2.bin", "../../etc/shadow")]
    )
    err = refused(
        LayerPlan(compression="none", files=signed, allow_symlinks=True, signed=signed), data
    )
    assert "outside the model" in err.reason


def test_refuses_member_written_through_a_symlink() -> None:
    signed = (("model/d/x", sha(WEIGHTS)), ("model/d", sha(WEIGHTS)))
    data = build_tar([link("model/d", "."), file("model/d/x", WEIGHTS)])
    p = LayerPlan(compression="none", files=signed, allow_symlinks=True, signed=signed)
    with pytest.raises(TarRefused):
        check_bytes(p, data)


@pytest.mark.parametrize("target", ["/etc", "../../etc", "weights", "."])
def test_refuses_symlink_under_an_ignore_rule(target: str) -> None:
    # OMS signers ignore .git by default. An ignored symlink is unsigned, yet every
    # later write under its name (an ignored raw layer titled .git/x, another tar
    # layer) goes where it points: outside the model, or over a signed file.
    data = build_tar(
        [
            file("model/weights.bin", WEIGHTS),
            file("model/config.json", CONFIG),
            link("model/.git", target),
        ]
    )
    err = refused(plan(ignore=("model/.git",)), data)
    assert err.path == "model/.git" and "symlink" in err.reason and "ignore" in err.reason
    allowed = plan(ignore=("model/.git",), allow_symlinks=True, signed=plan().files)
    assert refused(allowed, data).path == "model/.git"


def test_refuses_hard_link() -> None:
    data = build_tar(
        [
            file("model/weights.bin", WEIGHTS),
            link("model/config.json", "model/weights.bin", tarfile.LNKTYPE),
        ]
    )
    assert "hard link" in refused(plan(), data).reason


def test_refuses_device_member() -> None:
    info = tarfile.TarInfo("model/weights.bin")
    info.type = tarfile.CHRTYPE
    assert "tar type" in refused(plan(), build_tar([(info, None)])).reason


def test_refuses_extra_unsigned_file() -> None:
    err = refused(plan(), model_tar(**{"model/backdoor.py": b"import os"}))
    assert err.path == "model/backdoor.py" and "not covered by the signature" in err.reason


def test_refuses_missing_signed_file() -> None:
    data = build_tar([file("model/weights.bin", WEIGHTS)])
    err = refused(plan(), data)
    assert err.path == "model/config.json" and "missing" in err.reason


def test_refuses_missing_file_even_if_another_is_ignored() -> None:
    data = build_tar([file("model/weights.bin", WEIGHTS), file("model/README", b"x")])
    err = refused(plan(ignore=("model/README",)), data)
    assert err.path == "model/config.json"


def test_refuses_file_with_wrong_digest() -> None:
    tampered = bytearray(WEIGHTS)
    tampered[5000] ^= 1
    err = refused(
        plan(),
        build_tar([file("model/weights.bin", bytes(tampered)), file("model/config.json", CONFIG)]),
    )
    assert err.path == "model/weights.bin" and f"signed sha256:{sha(WEIGHTS)}" in err.reason


def test_refuses_duplicate_member_overwriting_a_checked_file() -> None:
    data = build_tar(
        [
            file("model/weights.bin", WEIGHTS),
            file("model/config.json", CONFIG),
            file("model/weights.bin", b"evil"),
        ]
    )
    assert "twice" in refused(plan(), data).reason


def test_refuses_data_after_end_of_archive() -> None:
    assert "after the end" in refused(plan(), model_tar() + b"hidden payload").reason


def test_refuses_truncated_archive() -> None:
    data = model_tar()
    assert "truncated" in refused(plan(), data[: len(data) // 2]).reason


def test_refuses_truncated_gzip() -> None:
    data = gzip.compress(model_tar())
    assert "gzip" in refused(plan("gzip"), data[:-20]).reason


def test_refuses_bad_header_checksum() -> None:
    data = bytearray(model_tar())
    data[1600] ^= 0x55  # inside the first header after the PAX/dir headers
    with pytest.raises(TarRefused):
        check_bytes(plan(), bytes(data))


def _gzip_bomb(expanded: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    header = tarfile.TarInfo("model/weights.bin")
    header.size = expanded
    parts = [compressor.compress(header.tobuf(tarfile.GNU_FORMAT))]
    zeros = bytes(1 << 20)
    for _ in range(expanded >> 20):
        parts.append(compressor.compress(zeros))
    parts.append(compressor.flush())
    return b"".join(parts)


def test_refuses_gzip_bomb_by_ratio() -> None:
    bomb = _gzip_bomb(512 << 20)  # 512 MiB of zeros in about half a MiB
    err = refused(plan("gzip"), bomb, piece=1 << 16)
    assert "decompression bomb" in err.reason and "ratio" in err.reason


def test_refuses_layer_expanding_past_the_size_cap() -> None:
    err = refused(plan("gzip", max_bytes=4096, max_ratio=10_000), gzip.compress(model_tar()))
    assert "decompression bomb" in err.reason


def test_refuses_zstd_bomb_by_ratio() -> None:
    header = tarfile.TarInfo("model/weights.bin")
    header.size = 256 << 20
    raw = header.tobuf(tarfile.GNU_FORMAT)
    compressor = zstandard.ZstdCompressor(level=3)
    out = io.BytesIO()
    with compressor.stream_writer(out, closefd=False) as writer:
        writer.write(raw)
        zeros = bytes(1 << 20)
        for _ in range(256):
            writer.write(zeros)
    err = refused(plan("zstd"), out.getvalue(), piece=1 << 16)
    assert "decompression bomb" in err.reason


def test_check_is_spent_after_a_refusal() -> None:
    check = TarCheck(plan())
    with pytest.raises(TarRefused):
        check.feed(build_tar([file("/abs", b"x")]))
    with pytest.raises(TarRefused):
        check.finish()


def test_plan_round_trips_and_fingerprint_ignores_the_label() -> None:
    p = plan("gzip", ignore=("a",))
    again = LayerPlan.from_json(p.to_json())
    assert again == p
    relabelled = LayerPlan.from_json({**p.to_json(), "source": "other"})
    assert relabelled.fingerprint() == p.fingerprint()
    assert plan("none").fingerprint() != p.fingerprint()


# ---- memory stays flat -------------------------------------------------------------

_RSS_PROBE = textwrap.dedent(
    """
    import hashlib, resource, sys, tarfile, zlib
    from proxy.pipeline.tarcheck import LayerPlan, TarCheck, TarRefused

    mode, size = sys.argv[1], int(sys.argv[2])
    piece = bytes(range(256)) * 4096  # 1 MiB, incompressible enough for a real layer
    info = tarfile.TarInfo("model/weights.bin"); info.size = size
    digest = hashlib.sha256()
    for _ in range(size >> 20):
        digest.update(piece)
    files = (("model/weights.bin", digest.hexdigest()),)
    compression = "gzip" if mode == "bomb" else "none"
    check = TarCheck(LayerPlan(compression=compression, files=files))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "bomb":
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
        zeros = bytes(1 << 20)
        try:
            check.feed(compressor.compress(info.tobuf(tarfile.GNU_FORMAT)))
            for _ in range(size >> 20):
                check.feed(compressor.compress(zeros))
            check.feed(compressor.flush())
            check.finish()
            print("accepted")
        except TarRefused as exc:
            print("refused:", exc.reason)
    else:
        check.feed(info.tobuf(tarfile.GNU_FORMAT))
        for _ in range(size >> 20):
            check.feed(piece)
        check.feed(bytes(1024))
        check.finish()
        print("accepted")
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """
)


def _rss_probe(mode: str, size: int) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, mode, str(size)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    return out[0], int(out[1])


def test_memory_stays_flat_over_a_big_file() -> None:
    verdict, grown_mib = _rss_probe("file", 512 << 20)
    assert verdict == "accepted"
    assert grown_mib < 32, f"RSS grew {grown_mib} MiB checking a 512 MiB file"


def test_refuses_gzip_bomb_with_bounded_rss() -> None:
    verdict, grown_mib = _rss_probe("bomb", 2 << 30)
    assert verdict.startswith("refused:") and "decompression bomb" in verdict
    assert grown_mib < 32, f"RSS grew {grown_mib} MiB on a gzip bomb"
