"""VerifiedManifestStore conformance: what every store of verified manifests, their
verdicts and tag resolutions must do.

The suite runs against ``DiskVerifiedManifests`` and ``MemoryVerifiedManifests``;
``NoVerifiedManifests`` keeps nothing and has its own case. Disk-only properties (the
on-disk layout existing caches were written in, torn files, restarts) follow.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from proxy.cache.memory import MemoryVerifiedManifests
from proxy.cache.verified import NoVerifiedManifests, VerifiedManifestStore
from proxy.cache.verified_disk import STALE_TMP_SECONDS, TMP_PREFIX, DiskVerifiedManifests
from proxy.oci.digest import Digest

from .fakes import blob_of

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
RAW = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'


@pytest.fixture(params=["disk", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> VerifiedManifestStore:
    if request.param == "memory":
        return MemoryVerifiedManifests()
    disk = DiskVerifiedManifests(root=tmp_path / "cache")
    disk.recover()
    return disk


def _disk(root: Path) -> DiskVerifiedManifests:
    store = DiskVerifiedManifests(root=root)
    store.recover()
    return store


def test_verified_manifest_round_trips_with_verdict_per_repository(
    store: VerifiedManifestStore,
) -> None:
    digest = Digest.of(RAW)
    store.put_manifest(
        digest,
        RAW,
        media_type=OCI_MANIFEST,
        repo="r.example/a",
        verdict={"allowed": True, "verifiedAt": 100.0},
    )
    store.put_manifest(
        digest,
        RAW,
        media_type=OCI_MANIFEST,
        repo="r.example/b",
        verdict={"allowed": True, "verifiedAt": 200.0},
    )
    stored = store.get_manifest(digest)
    assert stored is not None
    assert stored.digest == digest
    assert stored.raw == RAW and stored.media_type == OCI_MANIFEST
    assert stored.verdicts["r.example/a"]["verifiedAt"] == 100.0
    assert stored.verdicts["r.example/b"]["verifiedAt"] == 200.0


def test_a_later_verdict_for_a_repository_replaces_the_earlier_one(
    store: VerifiedManifestStore,
) -> None:
    digest = Digest.of(RAW)
    verdict = {"allowed": True, "verifiedAt": 100.0, "reason": "signed"}
    store.put_manifest(digest, RAW, media_type=OCI_MANIFEST, repo="r/a", verdict=verdict)
    later = {"allowed": False, "verifiedAt": 300.0, "reason": "key revoked"}
    store.put_manifest(digest, RAW, media_type=OCI_MANIFEST, repo="r/a", verdict=later)
    stored = store.get_manifest(digest)
    assert stored is not None
    assert dict(stored.verdicts) == {"r/a": later}


def test_verdicts_are_kept_by_value(store: VerifiedManifestStore) -> None:
    digest = Digest.of(RAW)
    verdict: dict[str, object] = {"allowed": True, "verifiedAt": 100.0, "details": ["a"]}
    store.put_manifest(digest, RAW, media_type=OCI_MANIFEST, repo="r/a", verdict=verdict)
    verdict["allowed"] = False  # the caller's dict changes after the write
    first = store.get_manifest(digest)
    assert first is not None and first.verdicts["r/a"]["allowed"] is True
    first.verdicts["r/a"]["details"].append("b")  # so does what a reader got back
    again = store.get_manifest(digest)
    assert again is not None and again.verdicts["r/a"]["details"] == ["a"]


def test_unknown_manifest_and_tag_are_misses(store: VerifiedManifestStore) -> None:
    assert store.get_manifest(Digest.of(b"never stored")) is None
    assert store.get_tag("r/a", "latest") is None
    assert store.recent_verdicts(0.0, limit=10) == []


def test_tag_records_are_per_repository_and_tag(store: VerifiedManifestStore) -> None:
    digest = Digest.of(b"manifest")
    store.put_tag("r/a", "v1", digest, 123.5)
    found = store.get_tag("r/a", "v1")
    assert found is not None
    assert found.digest == digest and found.resolved_at == 123.5
    assert store.get_tag("r/a", "v2") is None
    assert store.get_tag("r/b", "v1") is None
    # Names that join to the same "repo:tag" text are still different tags.
    store.put_tag("r/a:b", "v1", digest, 1.0)
    assert store.get_tag("r/a", "b:v1") is None
    store.put_tag("r/a", "v1", Digest.of(b"newer"), 200.0)
    again = store.get_tag("r/a", "v1")
    assert again is not None and again.digest == Digest.of(b"newer")


def test_recent_verdicts_lists_only_fresh_allowing_verdicts_newest_first(
    store: VerifiedManifestStore,
) -> None:
    now = time.time()
    manifests = [blob_of(200, seed=500 + i) for i in range(4)]

    def put(index: int, repo: str, *, allowed: bool, age: float) -> Digest:
        raw, digest = manifests[index]
        store.put_manifest(
            digest,
            raw,
            media_type=OCI_MANIFEST,
            repo=repo,
            verdict={"allowed": allowed, "verifiedAt": now - age},
        )
        return digest

    newest = put(0, "r.test/a", allowed=True, age=1)
    older = put(1, "r.test/b", allowed=True, age=50)
    put(2, "r.test/c", allowed=False, age=1)  # a refusal is never restored
    put(3, "r.test/d", allowed=True, age=500)  # older than the window
    put(1, "r.test/e", allowed=True, age=20)  # same manifest, another repository

    recent = store.recent_verdicts(now - 100, limit=10)
    assert [(v.digest, v.repo) for v in recent] == [
        (newest, "r.test/a"),
        (older, "r.test/e"),
        (older, "r.test/b"),
    ]
    assert all(v.media_type == OCI_MANIFEST for v in recent)
    assert [v.repo for v in store.recent_verdicts(now - 100, limit=1)] == ["r.test/a"]


def test_recent_verdicts_skip_records_without_a_verification_time(
    store: VerifiedManifestStore,
) -> None:
    digest = Digest.of(RAW)
    for repo, verdict in {
        "r/none": {"allowed": True},
        "r/text": {"allowed": True, "verifiedAt": "yesterday"},
        "r/truthy": {"allowed": 1, "verifiedAt": time.time()},
    }.items():
        store.put_manifest(digest, RAW, media_type=OCI_MANIFEST, repo=repo, verdict=verdict)
    assert store.recent_verdicts(0.0, limit=10) == []


def test_no_store_keeps_nothing() -> None:
    store: VerifiedManifestStore = NoVerifiedManifests()
    digest = Digest.of(RAW)
    store.put_manifest(
        digest,
        RAW,
        media_type=OCI_MANIFEST,
        repo="r/a",
        verdict={"allowed": True, "verifiedAt": time.time()},
    )
    store.put_tag("r/a", "v1", digest, time.time())
    assert store.get_manifest(digest) is None
    assert store.get_tag("r/a", "v1") is None
    assert store.recent_verdicts(0.0, limit=10) == []


# -- disk only -------------------------------------------------------------------------


def test_disk_refuses_stored_manifest_whose_bytes_changed(tmp_path: Path) -> None:
    store = _disk(tmp_path)
    raw = b'{"schemaVersion":2}'
    digest = Digest.of(raw)
    store.put_manifest(
        digest, raw, media_type="application/json", repo="r/a", verdict={"allowed": True}
    )
    assert store.get_manifest(digest) is not None
    (store.manifest_dir / digest.hex).write_bytes(b'{"schemaVersion":3}')
    assert store.get_manifest(digest) is None


def test_disk_reads_a_cache_written_in_the_existing_layout(tmp_path: Path) -> None:
    """Caches written before the manifest store had its own class keep working: the
    files are where, and what, they were."""
    now = time.time()
    digest = Digest.of(RAW)
    manifests = tmp_path / "manifests" / "sha256"
    tags = tmp_path / "tags"
    manifests.mkdir(parents=True)
    tags.mkdir()
    (manifests / digest.hex).write_bytes(RAW)
    verdict = {"allowed": True, "verifiedAt": now, "mode": "enforce", "policyRevision": "r1"}
    meta = {"mediaType": OCI_MANIFEST, "verdicts": {"r.test/app": verdict}}
    (manifests / f"{digest.hex}.json").write_bytes(json.dumps(meta, sort_keys=True).encode())
    tag = {"repository": "r.test/app", "tag": "v1", "digest": str(digest), "resolvedAt": now}
    (tags / hashlib.sha256(b"r.test/app:v1").hexdigest()).write_bytes(json.dumps(tag).encode())

    store = _disk(tmp_path)
    stored = store.get_manifest(digest)
    assert stored is not None and stored.raw == RAW
    assert dict(stored.verdicts) == {"r.test/app": verdict}
    found = store.get_tag("r.test/app", "v1")
    assert found is not None and found.digest == digest and found.resolved_at == now
    assert [(v.digest, v.repo) for v in store.recent_verdicts(now - 10, limit=5)] == [
        (digest, "r.test/app")
    ]


def test_disk_writes_the_existing_layout(tmp_path: Path) -> None:
    store = _disk(tmp_path)
    digest = Digest.of(RAW)
    store.put_manifest(digest, RAW, media_type=OCI_MANIFEST, repo="r/a", verdict={"allowed": True})
    store.put_tag("r/a", "v1", digest, 5.0)
    assert (tmp_path / "manifests" / "sha256" / digest.hex).read_bytes() == RAW
    meta = json.loads((tmp_path / "manifests" / "sha256" / f"{digest.hex}.json").read_bytes())
    assert meta == {"mediaType": OCI_MANIFEST, "verdicts": {"r/a": {"allowed": True}}}
    tag = json.loads((tmp_path / "tags" / hashlib.sha256(b"r/a:v1").hexdigest()).read_bytes())
    assert tag == {"repository": "r/a", "tag": "v1", "digest": str(digest), "resolvedAt": 5.0}
    leftovers = [
        name
        for directory in (store.manifest_dir, store.tag_dir)
        for name in os.listdir(directory)
        if name.startswith(TMP_PREFIX)
    ]
    assert leftovers == []


def test_disk_records_survive_a_restart(tmp_path: Path) -> None:
    first = _disk(tmp_path)
    digest = Digest.of(RAW)
    first.put_manifest(digest, RAW, media_type=OCI_MANIFEST, repo="r/a", verdict={"allowed": True})
    first.put_tag("r/a", "v1", digest, 7.0)
    second = _disk(tmp_path)
    assert second.get_manifest(digest) is not None
    assert second.get_tag("r/a", "v1") is not None


def test_disk_refuses_a_tag_record_that_belongs_to_another_tag(tmp_path: Path) -> None:
    store = _disk(tmp_path)
    store.put_tag("r/a", "v1", Digest.of(b"one"), 1.0)
    store.put_tag("r/a", "v2", Digest.of(b"two"), 2.0)
    v1 = store.tag_dir / hashlib.sha256(b"r/a:v1").hexdigest()
    v2 = store.tag_dir / hashlib.sha256(b"r/a:v2").hexdigest()
    v1.write_bytes(v2.read_bytes())  # a record copied under the wrong name
    assert store.get_tag("r/a", "v1") is None


def test_disk_recover_removes_stale_temp_files_only(tmp_path: Path) -> None:
    store = _disk(tmp_path)
    digest = Digest.of(RAW)
    store.put_manifest(digest, RAW, media_type=OCI_MANIFEST, repo="r/a", verdict={"allowed": True})
    stale = store.manifest_dir / f"{TMP_PREFIX}{digest.hex}.json.abc"
    fresh = store.tag_dir / f"{TMP_PREFIX}0123.def"
    stale.write_bytes(b"{")
    fresh.write_bytes(b"{")
    old = time.time() - STALE_TMP_SECONDS - 10
    os.utime(stale, (old, old))

    again = DiskVerifiedManifests(root=tmp_path)
    assert again.recover() == 1
    assert not stale.exists()
    assert fresh.exists(), "a young temp file may be another process's write in progress"
    assert again.get_manifest(digest) is not None
