"""Allowances shared between worker processes: the store itself, and gates (one per
"worker") over one store: record in one, serve from another, refuse everywhere,
revoke across workers, a restarted worker, and policy-reload retention."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.oci.digest import Digest
from proxy.oci.manifest import ArtifactKind, Manifest
from proxy.pipeline.gate import ArtifactSource, RepoKey
from proxy.pipeline.shared import BLOBS, CHILDREN, SharedAllowances
from proxy.verify.base import CheckResult, Limits, Subject
from proxy.verify.policy import Leaf, Policy, Scope, glob_to_regex
from proxy.verify.signature_gate import COVERED, SignatureGate
from proxy.verify.verdicts import VerdictCache
from tests.support import cosign_sign as cs
from tests.unit.verify.manifests import image, index

REPO = RepoKey("registry.example.test", "team/app")
OTHER_REPO = RepoKey("registry.example.test", "other/app")
SOURCE = cs.MemoryRegistry()
ROOT = Path(__file__).resolve().parents[3]


class Clock:
    """One fake clock for every "worker" (wall clock and verdict caches alike)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeVerifier:
    label: str
    ok: bool = True
    clock: Clock | None = None
    takes: float = 0.0
    """Seconds of the fake clock one verification takes."""
    hold: asyncio.Event | None = None
    """Set: each verification waits for it (its result is fixed when it starts)."""
    calls: list[Digest] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def describe(self) -> str:
        return self.label

    async def verify(self, subject: Subject, source: ArtifactSource, limits: Limits) -> CheckResult:
        self.calls.append(subject.digest)
        self.started.set()
        ok = self.ok
        if self.hold is not None:
            await self.hold.wait()
        if self.clock is not None:
            self.clock.now += self.takes
        return CheckResult(ok, "signature verified" if ok else "no signatures found")


def scope(match: str, verifier: FakeVerifier, *, fingerprint: str) -> Scope:
    return Scope(
        match=match,
        mode="enforce",
        require=Leaf(verifier),
        _regex=glob_to_regex(match),
        fingerprint=fingerprint,
    )


def two_scopes(
    verifier: FakeVerifier, *, team: str = "team-1", other: str = "other-1", revision: str = "r1"
) -> Policy:
    """Scopes for team/** and other/**, with the fingerprints their YAML would give."""
    return Policy(
        default="deny",
        scopes=(
            scope("registry.example.test/team/**", verifier, fingerprint=team),
            scope("registry.example.test/other/**", verifier, fingerprint=other),
        ),
        limits=Limits(),
        positive_ttl=300,
        negative_ttl=30,
        revision=revision,
        source="<test>",
    )


def open_store(path: Path) -> SharedAllowances:
    return SharedAllowances(path, covered_fingerprint=COVERED)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "allowances.db"
    SharedAllowances.create(path)
    return path


def worker(store_path: Path, policy: Policy, clock: Clock | None = None) -> SignatureGate:
    """One worker's gate over the node's shared store."""
    clock = clock or Clock()
    return SignatureGate(
        policy,
        shared=open_store(store_path),
        verdicts=VerdictCache(clock=clock),
        wall_clock=clock,
    )


def allows_blobs(gate: SignatureGate, repo: RepoKey, manifest: Manifest) -> bool:
    return all(gate.blob_allowed(repo, d) for d in manifest.blob_digests)


def refuses_blobs(gate: SignatureGate, repo: RepoKey, manifest: Manifest) -> bool:
    """Its layers are refused (the test images share one config blob)."""
    return not any(gate.blob_allowed(repo, layer.digest) for layer in manifest.layers)


# ---- the store ---------------------------------------------------------------------------


def record(
    store: SharedAllowances,
    manifest: Manifest,
    *,
    repo: RepoKey = REPO,
    unless_revoked_after: int | None = None,
) -> bool:
    return store.record(
        repo,
        manifest.digest,
        {BLOBS: manifest.blob_digests},
        artifact=ArtifactKind(),
        fingerprint="fp",
        revision="r1",
        decided_at=time.time(),
        decision="{}",
        unless_revoked_after=unless_revoked_after,
    )


def test_a_grant_recorded_by_one_instance_is_found_by_another(store_path: Path) -> None:
    writer, reader = open_store(store_path), open_store(store_path)
    manifest = image(b"shared")
    assert record(writer, manifest)
    layer = next(iter(manifest.blob_digests))
    [grant] = reader.grants_for(BLOBS, REPO, layer)
    assert grant.manifest == manifest.digest and grant.fingerprint == "fp"
    assert reader.digests(grant) == manifest.blob_digests
    assert reader.grants_for(BLOBS, OTHER_REPO, layer) == []
    assert reader.grants_for(CHILDREN, REPO, layer) == []
    assert reader.grants_for(BLOBS, REPO, Digest.of(b"never referenced")) == []


def test_a_manifest_keeps_one_grant_per_deciding_scope(store_path: Path) -> None:
    """A pod's scope and the scope for everyone may both allow an index: neither
    replaces the other's coverage, and a refusal removes both."""
    store = open_store(store_path)
    child = image(b"child of an index allowed twice")
    parent = index(child)
    for fingerprint in ("pod scope", "scope for everyone", "pod scope"):
        store.record(
            REPO,
            parent.digest,
            {CHILDREN: [child.digest]},
            artifact=ArtifactKind(),
            fingerprint=fingerprint,
            revision="r1",
            decided_at=time.time(),
            decision="{}",
        )
    grants = store.grants_for(CHILDREN, REPO, child.digest)
    assert sorted(g.fingerprint for g in grants) == ["pod scope", "scope for everyone"]
    found = store.grant(CHILDREN, REPO, parent.digest, fingerprint="scope for everyone")
    assert found is not None and found.fingerprint == "scope for everyone"
    assert store.grant(CHILDREN, REPO, parent.digest, fingerprint="another scope") is None
    store.revoke(REPO, parent.digest)
    assert store.grants_for(CHILDREN, REPO, child.digest) == []


def test_a_grant_recorded_in_one_process_is_found_in_another(store_path: Path) -> None:
    manifest = image(b"cross-process")
    layer = next(iter(manifest.blob_digests))
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from proxy.pipeline.gate import RepoKey\n"
        "from proxy.oci.digest import Digest\n"
        "from proxy.oci.manifest import ArtifactKind\n"
        "from proxy.pipeline.shared import BLOBS, SharedAllowances\n"
        "store = SharedAllowances(Path(sys.argv[1]), covered_fingerprint='(index)')\n"
        "repo = RepoKey('registry.example.test', 'team/app')\n"
        "store.record(repo, Digest.parse(sys.argv[2]), {BLOBS: [Digest.parse(sys.argv[3])]},\n"
        "             artifact=ArtifactKind(), fingerprint='fp', revision='r1',\n"
        "             decided_at=time.time(), decision='{}')\n"
        "print(len(store.grants_for(BLOBS, repo, Digest.parse(sys.argv[3]))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(store_path), str(manifest.digest), str(layer)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "1"
    [grant] = open_store(store_path).grants_for(BLOBS, REPO, layer)
    assert grant.manifest == manifest.digest


def test_revoking_drops_grants_and_the_coverage_they_gave_and_is_logged(
    store_path: Path,
) -> None:
    store, other = open_store(store_path), open_store(store_path)
    child = image(b"child")
    parent = index(child)
    now = time.time()
    store.record(
        REPO,
        parent.digest,
        {BLOBS: [], CHILDREN: [child.digest]},
        artifact=ArtifactKind(),
        fingerprint="fp",
        revision="r1",
        decided_at=now,
        decision="{}",
    )
    store.record(
        REPO,
        child.digest,
        {BLOBS: child.blob_digests},
        artifact=ArtifactKind(),
        fingerprint=COVERED,
        revision="r1",
        decided_at=now,
        decision="{}",
    )
    assert len(store) == 3
    mark = other.revocation_mark()
    seq = store.revoke(REPO, parent.digest)
    assert len(store) == 0  # the index's grants, then the child it covered
    revoked, newest, complete = other.revocations_after(mark)
    assert revoked == [(REPO, parent.digest)] and newest == seq and complete
    assert other.revoked_since(REPO, parent.digest, mark)
    assert not other.revoked_since(REPO, parent.digest, seq)
    assert not other.revoked_since(OTHER_REPO, parent.digest, mark)


def test_nothing_is_recorded_for_a_manifest_refused_after_the_decision_began(
    store_path: Path,
) -> None:
    store = open_store(store_path)
    manifest = image(b"refused meanwhile")
    mark = store.revocation_mark()
    store.revoke(REPO, manifest.digest)
    assert not record(store, manifest, unless_revoked_after=mark)
    assert len(store) == 0
    # A decision begun after the refusal is newer than it: recorded.
    assert record(store, manifest, unless_revoked_after=store.revocation_mark())


def test_the_store_is_bounded_oldest_grants_first(store_path: Path) -> None:
    store = SharedAllowances(store_path, covered_fingerprint=COVERED, max_manifests=3)
    manifests = [image(f"layer {i}".encode()) for i in range(5)]
    for manifest in manifests:
        record(store, manifest)
    assert len(store) == 3
    kept = {
        g.manifest
        for m in manifests
        for d in m.blob_digests
        for g in store.grants_for(BLOBS, REPO, d)
    }
    assert kept == {m.digest for m in manifests[2:]}


def test_a_trimmed_revocation_log_says_so(store_path: Path) -> None:
    store = SharedAllowances(store_path, covered_fingerprint=COVERED, max_revocations=2)
    mark = store.revocation_mark()
    for i in range(4):
        store.revoke(REPO, image(f"refused {i}".encode()).digest)
    revoked, _, complete = store.revocations_after(mark)
    assert len(revoked) == 2 and not complete


# ---- gates of several workers over one store -----------------------------------------------


async def test_a_blob_verified_in_one_worker_is_served_by_another(store_path: Path) -> None:
    verifier = FakeVerifier("v")
    first, second = (
        worker(store_path, two_scopes(verifier)),
        worker(store_path, two_scopes(verifier)),
    )
    manifest = image(b"verified in the first worker")
    assert (await first.check_manifest(REPO, manifest, SOURCE)).allowed
    assert allows_blobs(second, REPO, manifest)
    assert refuses_blobs(second, OTHER_REPO, manifest)  # no oracle for another repository
    # The second worker takes the first one's decision instead of verifying again.
    verdict = await second.check_manifest(REPO, manifest, SOURCE)
    assert verdict.allowed and verdict.reason.endswith("signature verified")
    assert verifier.calls == [manifest.digest]


async def test_a_blob_no_verified_manifest_references_is_refused_in_every_worker(
    store_path: Path,
) -> None:
    verifier = FakeVerifier("v")
    workers = [worker(store_path, two_scopes(verifier)) for _ in range(3)]
    await workers[0].check_manifest(REPO, image(b"some other image"), SOURCE)
    stray = Digest.of(b"a blob nobody verified")
    assert not any(w.blob_allowed(REPO, stray) for w in workers)


async def test_a_refusal_in_one_worker_closes_what_the_manifest_allowed_in_all(
    store_path: Path,
) -> None:
    clock = Clock()
    # Verifying takes 100 s here: the first worker's own verdict (kept from when it
    # finished) outlives the decision it shared (dated from when it began).
    verifier = FakeVerifier("v", clock=clock, takes=100)
    first = worker(store_path, two_scopes(verifier), clock)
    second = worker(store_path, two_scopes(verifier), clock)
    manifest = image(b"signature removed later")
    await first.check_manifest(REPO, manifest, SOURCE)
    assert allows_blobs(second, REPO, manifest)  # now in the second worker's memory too
    # The signature goes away; the shared decision expires and the second worker
    # decides again, and refuses.
    verifier.ok, verifier.takes = False, 0
    clock.now += 250
    assert not (await second.check_manifest(REPO, manifest, SOURCE)).allowed
    assert refuses_blobs(second, REPO, manifest)
    assert refuses_blobs(first, REPO, manifest)  # held in memory, closed by the log
    # Nor does the first worker's own verdict, still live, bring it back.
    calls = len(verifier.calls)
    assert not (await first.check_manifest(REPO, manifest, SOURCE)).allowed
    assert len(verifier.calls) == calls + 1
    assert refuses_blobs(first, REPO, manifest)


async def test_a_decision_overtaken_by_a_refusal_elsewhere_is_made_again(
    store_path: Path,
) -> None:
    held = FakeVerifier("held", hold=asyncio.Event())
    refusing = FakeVerifier("refusing", ok=False)
    first = worker(store_path, two_scopes(held))
    second = worker(store_path, two_scopes(refusing))
    manifest = image(b"refused while the first worker verified it")
    pending = asyncio.create_task(first.check_manifest(REPO, manifest, SOURCE))
    await held.started.wait()
    assert not (await second.check_manifest(REPO, manifest, SOURCE)).allowed
    # The first decision (an allow on older material) completes after the refusal;
    # what the second worker saw is what the first one sees now.
    held.ok = False
    assert held.hold is not None
    held.hold.set()
    assert not (await pending).allowed
    assert len(held.calls) == 2  # decided again, not recorded on the stale allow
    assert refuses_blobs(first, REPO, manifest) and refuses_blobs(second, REPO, manifest)


async def test_a_restarted_worker_keeps_what_is_allowed_and_refused(store_path: Path) -> None:
    clock = Clock()
    verifier = FakeVerifier("v")
    first = worker(store_path, two_scopes(verifier), clock)
    kept, refused = image(b"still allowed"), image(b"refused before the restart")
    await first.check_manifest(REPO, kept, SOURCE)
    await first.check_manifest(REPO, refused, SOURCE)
    verifier.ok = False
    clock.now += 301  # verdicts expire; allowances stay
    assert not (await first.check_manifest(REPO, refused, SOURCE)).allowed
    restarted = worker(store_path, two_scopes(verifier), clock)
    assert allows_blobs(restarted, REPO, kept)
    assert refuses_blobs(restarted, REPO, refused)
    assert not (await restarted.check_manifest(REPO, refused, SOURCE)).allowed


async def test_a_worker_started_under_a_changed_scope_does_not_trust_its_old_grants(
    store_path: Path,
) -> None:
    verifier = FakeVerifier("v")
    first = worker(store_path, two_scopes(verifier))
    team, other = image(b"team"), image(b"other")
    await first.check_manifest(REPO, team, SOURCE)
    await first.check_manifest(OTHER_REPO, other, SOURCE)
    # Restarted after the other/** scope changed (say, its key was rotated).
    restarted = worker(store_path, two_scopes(verifier, other="other-2", revision="r2"))
    assert allows_blobs(restarted, REPO, team)  # its deciding scope is unchanged
    assert refuses_blobs(restarted, OTHER_REPO, other)
    calls = len(verifier.calls)
    await restarted.check_manifest(OTHER_REPO, other, SOURCE)  # not reused: verified again
    assert len(verifier.calls) == calls + 1


async def test_reload_retention_holds_across_workers(store_path: Path) -> None:
    verifier = FakeVerifier("v")
    first, second = (
        worker(store_path, two_scopes(verifier)),
        worker(store_path, two_scopes(verifier)),
    )
    team, other = image(b"team"), image(b"other")
    await first.check_manifest(REPO, team, SOURCE)
    await first.check_manifest(OTHER_REPO, other, SOURCE)
    changed = two_scopes(verifier, other="other-2", revision="r2")
    # The second worker reloads first: the changed scope's grant no longer counts there.
    assert second.replace_policy(changed)
    assert allows_blobs(second, REPO, team)
    assert refuses_blobs(second, OTHER_REPO, other)
    # The first worker, not reloaded yet, keeps what its own policy still allows ...
    assert allows_blobs(first, OTHER_REPO, other)
    # ... until it reloads too.
    assert first.replace_policy(changed)
    assert allows_blobs(first, REPO, team) and refuses_blobs(first, OTHER_REPO, other)
    # A worker that starts now finds only what the policy in force keeps.
    fresh = worker(store_path, changed)
    assert allows_blobs(fresh, REPO, team) and refuses_blobs(fresh, OTHER_REPO, other)


async def test_a_grant_recorded_by_a_lagging_worker_is_not_trusted_after_the_reload(
    store_path: Path,
) -> None:
    verifier = FakeVerifier("v")
    reloaded = worker(store_path, two_scopes(verifier, other="other-2", revision="r2"))
    lagging = worker(store_path, two_scopes(verifier))
    other = image(b"verified under the old scope")
    await lagging.check_manifest(OTHER_REPO, other, SOURCE)
    assert refuses_blobs(reloaded, OTHER_REPO, other)
    calls = len(verifier.calls)
    await reloaded.check_manifest(OTHER_REPO, other, SOURCE)
    assert len(verifier.calls) == calls + 1 and allows_blobs(reloaded, OTHER_REPO, other)


async def test_index_coverage_is_shared_and_ends_with_the_index(store_path: Path) -> None:
    clock = Clock()
    verifier = FakeVerifier("v")
    first = worker(store_path, two_scopes(verifier), clock)
    second = worker(store_path, two_scopes(verifier), clock)
    child = image(b"platform child")
    parent = index(child)
    await first.check_manifest(REPO, parent, SOURCE)
    assert second.child_allowed(REPO, child.digest)
    # The second worker lets the child through on the index's signature ...
    assert (await second.check_manifest(REPO, child, SOURCE)).allowed
    assert verifier.calls == [parent.digest]
    # ... and the first serves the child's blobs through that coverage.
    assert allows_blobs(first, REPO, child)
    verifier.ok = False
    clock.now += 301
    assert not (await first.check_manifest(REPO, parent, SOURCE)).allowed
    for gate in (first, second):
        assert not gate.child_allowed(REPO, child.digest)
        assert refuses_blobs(gate, REPO, child)


async def test_an_expired_decision_of_a_sibling_is_not_reused(store_path: Path) -> None:
    clock = Clock()
    verifier = FakeVerifier("v")
    first = worker(store_path, two_scopes(verifier), clock)
    second = worker(store_path, two_scopes(verifier), clock)
    manifest = image(b"decided a while ago")
    await first.check_manifest(REPO, manifest, SOURCE)
    clock.now += 301
    await second.check_manifest(REPO, manifest, SOURCE)
    assert verifier.calls == [manifest.digest, manifest.digest]
    # Allowances outlive the verdict TTL (a long pull keeps going), as in one process.
    assert allows_blobs(second, REPO, manifest) and allows_blobs(first, REPO, manifest)
