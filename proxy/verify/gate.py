"""The signature gate: the policy decides every manifest; verified manifests allow blobs.

``SignatureGate`` implements ``proxy.gate.Gate``. For each manifest it

1. lets a child manifest through while a verified index of the same repository covers
   it (the index's scope says ``indexes: coverChildren``, the default): the index's
   signature covers its children's digests, so the index's scope decides for them.
   This is looked up live, never cached, so it ends when the index's allowance does;
2. returns a cached decision for (registry, repository, digest, policy revision);
3. picks the most specific scope for the repository and the manifest's artifactType,
   or applies the policy default;
4. evaluates the scope's requirements within the verification deadline (concurrent
   requests for the same digest share one evaluation);
5. on an allowing verdict, records the blobs (config, layers) the manifest allows in
   this repository and, for a verified index that covers its children, the child
   manifests; a refusing verdict revokes what the same manifest allowed before (and
   the coverage of the children it covered).

Blob allowances are per repository, so a digest verified in one repository is no
oracle for another. They outlive the verdict cache (a pull of a 100 GB image may take
longer than the positive TTL) but are bounded (LRU over manifests and entries). On a
policy reload each allowance is kept only if the scope that decided it is unchanged
(its YAML, the limits and every trust file), so editing one scope does not break pulls
in flight under the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.gate import ArtifactSource, RepoKey, Verdict
from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import UpstreamUnavailable
from proxy.oci.manifest import Manifest
from proxy.verify.base import Subject
from proxy.verify.cache import VerdictCache, VerdictKey
from proxy.verify.policy import Policy, Scope, truncate

log = logging.getLogger("pullgate.gate")

MAX_ALLOWED_MANIFESTS = 16384
MAX_ALLOWED_ENTRIES = 131072
DEADLINE_EXCEEDED = "verification deadline exceeded"
DEFAULT_SCOPE = "(default)"
COVERED = "(index)"
# Decisions tried per check while reloads keep replacing the policy under it.
MAX_POLICY_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict plus what the gate needs to know to record allowances."""

    verdict: Verdict
    verified: bool = False
    """A signature requirement passed (enforce or warn), or a verified index covers it."""
    cover_children: bool = False
    """The deciding scope lets a verified index cover its child manifests."""
    fingerprint: str = ""
    """What decided it (scope or default); allowances survive a reload only if it is
    equal under the new policy. "" never survives."""
    would_refuse: bool = False
    """Allowed only because of mode warn / default warn."""


@dataclass(slots=True)
class _Entry:
    digests: frozenset[Digest]
    artifact_type: str | None
    fingerprint: str


class Allowances:
    """What allowed manifests let through, per repository.

    Each (repository, manifest) records the digests it allows; a digest is allowed in a
    repository while any recorded manifest of that repository lists it. Bounded: the
    least recently checked manifests go first.
    """

    def __init__(
        self, *, max_manifests: int = MAX_ALLOWED_MANIFESTS, max_entries: int = MAX_ALLOWED_ENTRIES
    ) -> None:
        self._manifests: OrderedDict[tuple[RepoKey, Digest], _Entry] = OrderedDict()
        self._counts: dict[tuple[RepoKey, Digest], int] = {}
        self._entries = 0
        self._max_manifests = max_manifests
        self._max_entries = max_entries

    def holds(self, repo: RepoKey, manifest: Digest, fingerprint: str) -> bool:
        """Whether ``manifest`` is recorded with ``fingerprint`` (marking it recently used)."""
        key = (repo, manifest)
        entry = self._manifests.get(key)
        if entry is None or entry.fingerprint != fingerprint:
            return False
        self._manifests.move_to_end(key)
        return True

    def record(
        self,
        repo: RepoKey,
        manifest: Digest,
        digests: Iterable[Digest],
        *,
        artifact_type: str | None = None,
        fingerprint: str = "",
    ) -> None:
        """Allow ``digests`` in ``repo`` on behalf of ``manifest``."""
        key = (repo, manifest)
        if key in self._manifests:
            self._drop(key)
        entry = _Entry(frozenset(digests), artifact_type, fingerprint)
        self._manifests[key] = entry
        for digest in entry.digests:
            counted = (repo, digest)
            self._counts[counted] = self._counts.get(counted, 0) + 1
        self._entries += len(entry.digests)
        # Evict the least recently used, but never the entry just recorded.
        while len(self._manifests) > 1 and (
            len(self._manifests) > self._max_manifests or self._entries > self._max_entries
        ):
            self._drop(next(iter(self._manifests)))

    def revoke(self, repo: RepoKey, manifest: Digest) -> bool:
        """Forget what ``manifest`` allowed in ``repo``; False if it allowed nothing."""
        key = (repo, manifest)
        if key not in self._manifests:
            return False
        self._drop(key)
        return True

    def _drop(self, key: tuple[RepoKey, Digest]) -> None:
        entry = self._manifests.pop(key)
        repo = key[0]
        for digest in entry.digests:
            counted = (repo, digest)
            left = self._counts[counted] - 1
            if left:
                self._counts[counted] = left
            else:
                del self._counts[counted]
        self._entries -= len(entry.digests)

    def __contains__(self, item: tuple[RepoKey, Digest]) -> bool:
        return item in self._counts

    def retain(self, keep: Iterable[tuple[RepoKey, Digest]]) -> None:
        """Drop every recorded manifest not in ``keep``."""
        kept = set(keep)
        for key in [k for k in self._manifests if k not in kept]:
            self._drop(key)

    def entries(self) -> list[tuple[RepoKey, Digest, str | None, str]]:
        """(repo, manifest, artifact type, fingerprint) of every recorded manifest."""
        return [(k[0], k[1], e.artifact_type, e.fingerprint) for k, e in self._manifests.items()]

    def __len__(self) -> int:
        return len(self._manifests)


class SignatureGate:
    """The policy's gate over manifests and blobs (implements ``proxy.gate.Gate``)."""

    def __init__(
        self,
        policy: Policy,
        *,
        metrics: Metrics | None = None,
        verdicts: VerdictCache[Decision] | None = None,
    ) -> None:
        self._policy = policy
        self._metrics = metrics
        self._verdicts: VerdictCache[Decision] = (
            verdicts if verdicts is not None else VerdictCache()
        )
        self._blobs = Allowances()
        self._children = Allowances()
        self._inflight: dict[VerdictKey, asyncio.Future[Decision]] = {}
        # Bound once: a labelled child lookup per request would dominate a cache hit.
        self._cache_hits = metrics.verdict_cache.labels("hit") if metrics else None
        self._cache_misses = metrics.verdict_cache.labels("miss") if metrics else None
        self._log_policy(policy, "loaded")

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def revision(self) -> str:
        return self._policy.revision

    @property
    def policy_in_force(self) -> bool:
        return True

    @property
    def positive_ttl(self) -> float:
        return self._policy.positive_ttl

    def replace_policy(self, policy: Policy) -> bool:
        """Swap in a new policy atomically; False if it is the one in force.

        Verdicts made under the old policy are dropped. Allowances stay only where the
        scope (or default) that decided them is the same under the new policy.
        """
        if policy.revision == self._policy.revision:
            return False
        old = self._policy
        self._policy = policy
        self._verdicts.clear()
        self._retain_allowances(policy)
        self._log_policy(policy, f"reloaded (was revision {old.revision[:16]})")
        return True

    def _retain_allowances(self, policy: Policy) -> None:
        def unchanged(repo: RepoKey, artifact_type: str | None, fingerprint: str) -> bool:
            if fingerprint == COVERED:
                return True  # kept while the covering index is (_drop_uncovered)
            scope = policy.scope_for(repo, artifact_type)
            return fingerprint != "" and _fingerprint(policy, scope) == fingerprint

        for allowances in (self._children, self._blobs):
            allowances.retain(
                (repo, manifest)
                for repo, manifest, artifact_type, fingerprint in allowances.entries()
                if unchanged(repo, artifact_type, fingerprint)
            )
        self._drop_uncovered()

    def _drop_uncovered(self) -> None:
        """Drop allowances that came from index coverage the index no longer gives."""
        # A covered child may be an index covering children in turn; digests form no
        # cycles, so this settles within the nesting depth.
        while True:
            uncovered = [
                (repo, manifest)
                for repo, manifest, _, fingerprint in self._children.entries()
                if fingerprint == COVERED and (repo, manifest) not in self._children
            ]
            if not uncovered:
                break
            for repo, manifest in uncovered:
                self._children.revoke(repo, manifest)
        self._blobs.retain(
            (repo, manifest)
            for repo, manifest, _, fingerprint in self._blobs.entries()
            if fingerprint != COVERED or (repo, manifest) in self._children
        )

    async def check_manifest(
        self, repo: RepoKey, manifest: Manifest, source: ArtifactSource
    ) -> Verdict:
        for _ in range(MAX_POLICY_ATTEMPTS):
            policy = self._policy
            decision = await self._lookup(policy, repo, manifest, source)
            if policy is self._policy:
                self._apply(repo, manifest, decision)
                return decision.verdict
            # The policy was replaced while verifying: decide again under the new one,
            # so no allowance is recorded on the strength of a superseded policy.
        raise UpstreamUnavailable("the signature policy kept changing during verification")

    async def _lookup(
        self, policy: Policy, repo: RepoKey, manifest: Manifest, source: ArtifactSource
    ) -> Decision:
        """1. index coverage, 2. a decision made under this revision, else an evaluation."""
        if (repo, manifest.digest) in self._children:
            return _COVERED_DECISION
        key = (repo.registry, repo.repository, str(manifest.digest), policy.revision)
        decision = self._verdicts.get(key)
        if decision is not None:
            if self._cache_hits is not None:
                self._cache_hits.inc()
            return decision
        if self._cache_misses is not None:
            self._cache_misses.inc()
        return await self._decide_once(key, policy, repo, manifest, source)

    def blob_allowed(self, repo: RepoKey, digest: Digest) -> bool:
        return (repo, digest) in self._blobs

    def child_allowed(self, repo: RepoKey, digest: Digest) -> bool:
        """Whether a verified index of ``repo`` covers the child manifest ``digest``."""
        return (repo, digest) in self._children

    # -- internals ---------------------------------------------------------------------

    def _apply(self, repo: RepoKey, manifest: Manifest, decision: Decision) -> None:
        """5. Record (or revoke) what the manifest lets through in this repository."""
        digest = manifest.digest
        verdict = decision.verdict
        if not verdict.allowed:
            self._blobs.revoke(repo, digest)
            if self._children.revoke(repo, digest):
                self._drop_uncovered()
            return
        if decision.would_refuse and self._metrics is not None:
            self._metrics.policy_warnings.labels(verdict.scope).inc()
        elif verdict.mode == "allow" and self._metrics is not None:
            self._metrics.policy_unverified.labels(verdict.scope).inc()
        if not self._blobs.holds(repo, digest, decision.fingerprint):
            self._blobs.record(
                repo,
                digest,
                manifest.blob_digests,
                artifact_type=manifest.effective_artifact_type,
                fingerprint=decision.fingerprint,
            )
        if (
            manifest.is_index
            and decision.verified
            and decision.cover_children
            and not self._children.holds(repo, digest, decision.fingerprint)
        ):
            self._children.record(
                repo,
                digest,
                (child.digest for child in manifest.manifests),
                artifact_type=manifest.effective_artifact_type,
                fingerprint=decision.fingerprint,
            )

    async def _decide_once(
        self,
        key: VerdictKey,
        policy: Policy,
        repo: RepoKey,
        manifest: Manifest,
        source: ArtifactSource,
    ) -> Decision:
        # Concurrent pulls of one digest share one verification; a caller that goes
        # away does not cancel it for the others (shield), and the deadline bounds it.
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(
                self._decide_and_cache(key, policy, repo, manifest, source)
            )
            self._inflight[key] = future
            future.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(future)

    def _finished(self, key: VerdictKey, done: asyncio.Future[Decision]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter got it already

    async def _decide_and_cache(
        self,
        key: VerdictKey,
        policy: Policy,
        repo: RepoKey,
        manifest: Manifest,
        source: ArtifactSource,
    ) -> Decision:
        decision = await self._decide(policy, repo, manifest, source)
        ttl = policy.positive_ttl if decision.verdict.allowed else policy.negative_ttl
        if policy is self._policy:
            self._verdicts.put(key, decision, ttl)
        return decision

    async def _decide(
        self, policy: Policy, repo: RepoKey, manifest: Manifest, source: ArtifactSource
    ) -> Decision:
        # 3. The most specific scope, or the default.
        scope = policy.scope_for(repo, manifest.effective_artifact_type)
        fingerprint = _fingerprint(policy, scope)
        if scope is None:
            return self._default_decision(policy, repo, fingerprint)
        if scope.mode == "allow" or scope.require is None:
            log.warning(
                "%s@%s served UNVERIFIED: %s opts out of signature verification",
                repo,
                manifest.digest,
                scope.label(),
            )
            return Decision(
                Verdict(
                    allowed=True,
                    reason=f"{scope.label()}: verification skipped by policy (mode allow)",
                    scope=scope.match,
                    mode="allow",
                ),
                fingerprint=fingerprint,
            )
        subject = Subject(
            registry=repo.registry,
            repository=repo.repository,
            digest=manifest.digest,
            media_type=manifest.media_type,
            size=len(manifest.raw),
        )
        # 4. Requirements, within the total verification deadline.
        deadline = policy.limits.deadline_seconds
        started = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout(deadline):
                result = await scope.require.evaluate(subject, source, policy.limits)
            outcome = "verified" if result.ok else "refused"
        except TimeoutError:
            outcome = "deadline"
            reason = f"{DEADLINE_EXCEEDED} ({deadline:g}s)"
            return self._scoped(scope, ok=False, reason=reason, fingerprint=fingerprint)
        finally:
            # The registry being down is no verdict: it propagates (5xx), never cached.
            if self._metrics is not None:
                self._metrics.verification_seconds.labels(outcome).observe(
                    time.perf_counter() - started
                )
        return self._scoped(scope, ok=result.ok, reason=result.reason, fingerprint=fingerprint)

    @staticmethod
    def _scoped(scope: Scope, *, ok: bool, reason: str, fingerprint: str) -> Decision:
        text = truncate(f"{scope.label()}: {reason}")
        cover = scope.cover_children
        if ok:
            verdict = Verdict(allowed=True, reason=text, scope=scope.match, mode=scope.mode)
            return Decision(verdict, verified=True, cover_children=cover, fingerprint=fingerprint)
        if scope.mode == "warn":
            log.warning("mode warn: serving what enforce would refuse: %s", text)
            verdict = Verdict(
                allowed=True,
                reason=f"would be refused (mode warn): {text}",
                scope=scope.match,
                mode="warn",
            )
            return Decision(verdict, fingerprint=fingerprint, would_refuse=True)
        verdict = Verdict(allowed=False, reason=text, scope=scope.match, mode=scope.mode)
        return Decision(verdict, fingerprint=fingerprint)

    @staticmethod
    def _default_decision(policy: Policy, repo: RepoKey, fingerprint: str) -> Decision:
        reason = f"no policy scope matches {repo} and default is {policy.default}"
        if policy.default == "allow":
            log.warning("%s served UNVERIFIED: %s", repo, reason)
            verdict = Verdict(allowed=True, reason=reason, scope=DEFAULT_SCOPE, mode="allow")
            return Decision(verdict, fingerprint=fingerprint)
        if policy.default == "warn":
            log.warning("default warn: serving unverified: %s", reason)
            verdict = Verdict(allowed=True, reason=reason, scope=DEFAULT_SCOPE, mode="warn")
            return Decision(verdict, fingerprint=fingerprint, would_refuse=True)
        # Anything but an explicit allow/warn refuses: a typo never opens the gate.
        verdict = Verdict(allowed=False, reason=reason, scope=DEFAULT_SCOPE, mode="enforce")
        return Decision(verdict, fingerprint=fingerprint)

    def _log_policy(self, policy: Policy, verb: str) -> None:
        log.info(
            "policy %s from %s (revision %s): %d scopes, default %s",
            verb,
            policy.source,
            policy.revision[:16],
            len(policy.scopes),
            policy.default,
        )
        if policy.default == "allow":
            log.warning("policy: default allow serves every unmatched reference UNVERIFIED")
        for scope in policy.scopes:
            if scope.mode == "allow":
                log.warning("policy: %s skips signature verification", scope.label())


def _fingerprint(policy: Policy, scope: Scope | None) -> str:
    """What a decision depended on: the scope's YAML, the limits and the trust files, or
    the default. "" (a scope not read from a file) never matches."""
    if scope is None:
        return f"default {policy.default}"
    if not scope.fingerprint:
        return ""
    return "\0".join((scope.fingerprint, repr(policy.limits), policy.trust_digest))


_COVERED_DECISION = Decision(
    Verdict(
        allowed=True,
        reason="covered by the signature of a verified index in this repository",
        scope=COVERED,
        mode="enforce",
    ),
    verified=True,
    cover_children=True,
    fingerprint=COVERED,
)
