"""The signature gate: the policy decides every manifest; verified manifests allow blobs.

``SignatureGate`` implements ``proxy.pipeline.gate.Gate``. For each manifest it

1. lets a child manifest through while a verified index of the same repository covers
   it (the index's scope says ``indexes: coverChildren``, the default): the index's
   signature covers its children's digests, so the index's scope decides for them,
   unless the child's own scope requires referrers of it (an SBOM, an attestation),
   which the index's signature does not prove. Coverage is recorded under the scope that
   verified the index and counts only for a pull whose own scope for that index is the
   same (a pod's scope may accept an index the scope for everyone refuses).
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

With several worker processes (``--workers N``) each worker runs its own gate over one
``SharedAllowances`` store (``proxy.pipeline.shared``):

- what a worker records (step 5) goes to its memory and to the store, with the decision,
  its fingerprint and the policy revision; a refusal also goes to the store's log of
  revocations;
- ``blob_allowed`` and ``child_allowed`` replay revocations the worker has not seen yet
  into its memory (one indexed read when there are none), then answer from memory, and
  only on a miss from the store, importing what they find;
- a grant from the store counts only if it was decided under the policy revision in
  force here, or its scope's fingerprint is what the policy in force gives it (the same
  rule as a reload, applied when it is read), and coverage only while a counted index
  covers it;
- step 2 also takes an allowing decision a sibling recorded within the positive TTL
  (so one pull is verified once per node, not once per worker);
- a decision reached while a sibling refused the same manifest is not recorded: it is
  decided again (the refusal may have seen newer signatures).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, replace
from functools import lru_cache, partial

from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import UpstreamUnavailable
from proxy.oci.manifest import ArtifactKind, Manifest
from proxy.pipeline.allowed import Allowances
from proxy.pipeline.gate import ArtifactSource, Pod, RepoKey, Verdict
from proxy.pipeline.shared import BLOBS, CHILDREN, Grant, SharedAllowances
from proxy.verify.base import CheckResult, Subject
from proxy.verify.policy import Leaf, Policy, Scope, truncate
from proxy.verify.verdicts import VerdictCache, VerdictKey

log = logging.getLogger("pullgate.gate")

DEADLINE_EXCEEDED = "verification deadline exceeded"
DEFAULT_SCOPE = "(default)"
COVERED = "(index)"
COVERED_REASON = "covered by the signature of a verified index in this repository"
# Decisions tried per check while reloads (or refusals in sibling workers) keep
# superseding it.
MAX_POLICY_ATTEMPTS = 3
# Index nesting followed when a shared coverage grant is checked.
MAX_COVER_DEPTH = 8


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
    equal under the new policy, and index coverage counts only for a pull whose scope
    for the index has it. "" never survives."""
    would_refuse: bool = False
    """Allowed only because of mode warn / default warn."""
    decided_at: float = 0.0
    """Wall-clock time the decision was reached (0: not recorded)."""

    def encode(self) -> str:
        """JSON for the shared store (a sibling worker may reuse it within the TTL)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str, *, fingerprint: str, decided_at: float) -> Decision | None:
        """The decision ``encode`` wrote, or None if it is not one (a flag that is not
        a JSON boolean included: it never opens anything)."""
        try:
            doc = json.loads(text)
            verdict = doc.pop("verdict")
            verdict["details"] = tuple(str(d) for d in verdict["details"])
            doc.update(fingerprint=fingerprint, decided_at=decided_at)
            decision = cls(Verdict(**verdict), **doc)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        flags = (decision.verdict.allowed, decision.verified, decision.cover_children)
        strict = all(type(flag) is bool for flag in (*flags, decision.would_refuse))
        return decision if strict else None


class SignatureGate:
    """The policy's gate over manifests and blobs (implements ``proxy.pipeline.gate.Gate``)."""

    policy_in_force = True

    def __init__(
        self,
        policy: Policy,
        *,
        metrics: Metrics | None = None,
        verdicts: VerdictCache[Decision] | None = None,
        shared: SharedAllowances | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._metrics = metrics
        self._verdicts = verdicts if verdicts is not None else VerdictCache[Decision]()
        self._blobs = Allowances()
        self._children = Allowances()
        self._inflight: dict[VerdictKey, asyncio.Future[Decision]] = {}
        # Bound once: a labelled child lookup per request would dominate a cache hit.
        self._cache_hits = metrics.verdict_cache.labels("hit") if metrics else None
        self._cache_misses = metrics.verdict_cache.labels("miss") if metrics else None
        # Shared with sibling workers (None: this process is the only one).
        self._shared = shared
        # A fresh worker holds nothing yet: older revocations do not concern it.
        self._revocations_seen = shared.revocation_mark() if shared is not None else 0
        # Dates decisions for siblings: one clock for every process on the node.
        self._wall_clock = wall_clock
        # (repo, artifact type, pod) -> fingerprint under the policy in force.
        self._fingerprint_for = lru_cache(maxsize=4096)(self._scope_fingerprint)
        self._announce(policy)

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def revision(self) -> str:
        return self._policy.revision

    @property
    def positive_ttl(self) -> float:
        return self._policy.positive_ttl

    def replace_policy(self, policy: Policy) -> bool:
        """Swap in a new policy atomically; False if it is the one in force.

        Verdicts made under the old policy are dropped. Allowances stay only where the
        scope (or default) that decided them is the same under the new policy; in the
        shared store too (siblings apply the same rule when they read it).
        """
        if policy.revision == self._policy.revision:
            return False
        old = self._policy
        self._policy = policy
        self._verdicts.clear()
        self._fingerprint_for.cache_clear()
        self._retain_allowances(policy)
        self._announce(policy, old)
        return True

    def _retain_allowances(self, policy: Policy) -> None:
        def unchanged(repo: RepoKey, artifact: ArtifactKind | None, fingerprint: str) -> bool:
            if fingerprint == COVERED:
                # Kept while the covering index is (_drop_uncovered), unless the
                # manifest's own scope now requires its referrers (no index proves those).
                return not _needs_own_referrers(policy, repo, artifact, None)
            return fingerprint != "" and fingerprint == self._fingerprint_for(repo, artifact)

        for allowances in (self._children, self._blobs):
            allowances.retain(
                (repo, manifest, fingerprint)
                for repo, manifest, artifact, fingerprint in allowances.entries()
                if unchanged(repo, artifact, fingerprint)
            )
        self._drop_uncovered()
        if self._shared is not None:
            try:
                dropped = self._shared.retain(
                    lambda g: unchanged(g.repo, g.artifact, g.fingerprint)
                )
            except Exception:
                # Not a safety problem: siblings check each grant against their policy.
                log.exception("could not drop shared allowances the new policy does not keep")
            else:
                log.info("policy reload: %d shared allowances dropped", dropped)

    def _drop_uncovered(self) -> None:
        """Drop allowances that came from index coverage the index no longer gives."""
        # A covered child may be an index covering children in turn; digests form no
        # cycles, so this settles within the nesting depth.
        while True:
            records = [(repo, manifest, fp) for repo, manifest, _, fp in self._children.entries()]
            kept = [r for r in records if r[2] != COVERED or r[:2] in self._children]
            if len(kept) == len(records):
                break
            self._children.retain(kept)
        self._blobs.retain(
            (repo, manifest, fingerprint)
            for repo, manifest, _, fingerprint in self._blobs.entries()
            if fingerprint != COVERED or (repo, manifest) in self._children
        )

    @property
    def pod_scoped(self) -> bool:
        """Whether the policy in force has scopes for some pods only."""
        return self._policy.pod_scoped

    async def check_manifest(
        self,
        repo: RepoKey,
        manifest: Manifest,
        source: ArtifactSource,
        *,
        pod: Pod | None = None,
    ) -> Verdict:
        for _ in range(MAX_POLICY_ATTEMPTS):
            policy = self._policy
            mark = self._sync()
            decision, fresh = await self._lookup(policy, repo, manifest, source, pod)
            if policy is not self._policy:
                # The policy was replaced while verifying: decide again under the new
                # one, so no allowance is recorded on the strength of a superseded policy.
                continue
            if self._apply(repo, manifest, decision, fresh=fresh, mark=mark):
                return decision.verdict
            # A sibling worker refused this manifest while it was decided here: its
            # refusal may rest on newer material, so decide again.
        raise UpstreamUnavailable(
            "the verdict kept being superseded during verification (policy reloads or "
            "refusals in other workers); try again"
        )

    async def _lookup(
        self,
        policy: Policy,
        repo: RepoKey,
        manifest: Manifest,
        source: ArtifactSource,
        pod: Pod | None,
    ) -> tuple[Decision, bool]:
        """1. index coverage, 2. a decision made under this revision, else an evaluation.

        The flag says whether the decision was evaluated just now (not cached).

        Where a scope for some pods applies (``pod``'s namespace or labels), the
        decision is theirs: cached under that scope, never taken from (or for) another
        context.
        """
        if self.child_allowed(repo, manifest.digest, pod) and not _needs_own_referrers(
            policy, repo, manifest.kind, pod
        ):
            return _COVERED_DECISION, False
        for_pod = policy.pod_scoped and pod is not None
        scope = policy.scope_for(repo, manifest.kind, pod) if for_pod else None
        pod_scope = scope if scope is not None and scope.for_pods else None
        key = _verdict_key(policy, repo, manifest.digest, pod_scope)
        decision = self._verdicts.get(key)
        if decision is None and self._shared is not None and pod_scope is None:
            decision = self._shared_decision(policy, key, repo, manifest)
        if decision is not None:
            if self._cache_hits is not None:
                self._cache_hits.inc()
            return decision, False
        if self._cache_misses is not None:
            self._cache_misses.inc()
        decided_for = pod if pod_scope is not None else None
        decide = partial(self._decide, policy, repo, manifest, source, decided_for)
        return await self._decide_once(key, policy, decide), True

    def blob_allowed(self, repo: RepoKey, digest: Digest) -> bool:
        if self._shared is None:
            return (repo, digest) in self._blobs
        self._sync()
        return self._allowed(self._blobs, BLOBS, repo, digest, depth=0)

    def child_allowed(self, repo: RepoKey, digest: Digest, pod: Pod | None = None) -> bool:
        """Whether a verified index of ``repo`` covers the child manifest ``digest`` for a
        pull for ``pod`` (None: no pod): an index verified by the scope this pull picks
        for it, or an index covered so in turn. Coverage decided by another pull's scope
        does not count: that scope may accept an index this one refuses."""
        self._sync()
        # Without scopes for pods every pull picks the same scopes.
        return self._covered(repo, digest, pod if self._policy.pod_scoped else None, depth=0)

    def _covered(self, repo: RepoKey, digest: Digest, pod: Pod | None, *, depth: int) -> bool:
        policy = self._policy

        def decided_for_this_pull(index: Digest, kind: ArtifactKind | None, by: str) -> bool:
            if by == COVERED:  # a nested index, let through as a child in turn
                return (
                    depth < MAX_COVER_DEPTH
                    and not _needs_own_referrers(policy, repo, kind, pod)
                    and self._covered(repo, index, pod, depth=depth + 1)
                )
            return by != "" and by == self._fingerprint_for(repo, kind, pod)

        if any(decided_for_this_pull(*h) for h in self._children.holders(repo, digest)):
            return True
        if self._shared is None:
            return False
        for grant in self._shared.grants_for(CHILDREN, repo, digest):
            if decided_for_this_pull(grant.manifest, grant.artifact, grant.fingerprint):
                self._import(self._children, grant)
                return True
        return False

    # -- shared with sibling workers -----------------------------------------------------

    def _sync(self) -> int:
        """Replay into memory the refusals siblings logged since the last call; returns
        the newest revocation seen (0 without a shared store)."""
        shared = self._shared
        if shared is None:
            return 0
        if shared.revocation_mark() == self._revocations_seen:
            return self._revocations_seen
        revoked, newest, complete = shared.revocations_after(self._revocations_seen)
        if not complete:
            # Trimmed before this worker read them: forget everything rather than guess.
            log.warning("missed refusals logged by other workers: dropping every allowance")
            self._blobs.clear()
            self._children.clear()
            self._verdicts.clear()
        else:
            # The log does not say which scope refused: a decision cached for some pods
            # is made again too (the refusal may rest on newer signatures).
            pod_scopes = [scope for scope in self._policy.scopes if scope.for_pods]
            for repo, manifest in revoked:
                self._revoke_local(repo, manifest, pod_scopes)
        self._revocations_seen = newest
        return newest

    def _allowed(
        self, local: Allowances, kind: int, repo: RepoKey, digest: Digest, *, depth: int
    ) -> bool:
        """Memory first, then grants in the shared store that count here (imported)."""
        if (repo, digest) in local:
            return True
        assert self._shared is not None
        for grant in self._shared.grants_for(kind, repo, digest):
            if self._counts_here(grant, depth=depth):
                self._import(local, grant)
                return True
        return False

    def _import(self, local: Allowances, grant: Grant) -> None:
        assert self._shared is not None
        local.record(
            grant.repo,
            grant.manifest,
            self._shared.digests(grant),
            artifact=grant.artifact,
            fingerprint=grant.fingerprint,
        )

    def _counts_here(self, grant: Grant, *, depth: int) -> bool:
        """Whether this worker's policy in force would keep ``grant`` (reload rule)."""
        if grant.fingerprint == COVERED:
            # Coverage counts while a grant that counts here still covers the manifest,
            # and its own scope here does not require its referrers.
            if _needs_own_referrers(self._policy, grant.repo, grant.artifact, None):
                return False
            return depth < MAX_COVER_DEPTH and self._allowed(
                self._children, CHILDREN, grant.repo, grant.manifest, depth=depth + 1
            )
        if grant.revision == self._policy.revision:
            return True
        return grant.fingerprint != "" and grant.fingerprint == self._fingerprint_for(
            grant.repo, grant.artifact
        )

    def _scope_fingerprint(
        self, repo: RepoKey, artifact: ArtifactKind | None, pod: Pod | None = None
    ) -> str:
        """The fingerprint of the scope the policy in force picks (for ``pod``)."""
        return _fingerprint(self._policy, self._policy.scope_for(repo, artifact, pod))

    def _shared_decision(
        self, policy: Policy, key: VerdictKey, repo: RepoKey, manifest: Manifest
    ) -> Decision | None:
        """2b. An allowing decision a sibling recorded within the positive TTL (not one
        a pod's namespace scope made: it is that pod's alone)."""
        assert self._shared is not None
        wanted = self._fingerprint_for(repo, manifest.kind) if policy.pod_scoped else None
        grant = self._shared.grant(BLOBS, repo, manifest.digest, fingerprint=wanted)
        if grant is None or grant.fingerprint == COVERED:
            return None
        left = policy.positive_ttl - (self._wall_clock() - grant.decided_at)
        if left <= 0 or not self._counts_here(grant, depth=0):
            return None
        decision = Decision.decode(
            grant.decision, fingerprint=grant.fingerprint, decided_at=grant.decided_at
        )
        if decision is None or not decision.verdict.allowed:
            return None
        self._verdicts.put(key, decision, left)
        return decision

    def _revoke_local(
        self, repo: RepoKey, manifest: Digest, pod_scopes: Iterable[Scope] = ()
    ) -> bool:
        """Forget what ``manifest`` allowed here, and any verdict that would restore it
        (cached for everyone, or for the pods of ``pod_scopes``)."""
        for pod_scope in (None, *pod_scopes):
            key = _verdict_key(self._policy, repo, manifest, pod_scope)
            cached = self._verdicts.get(key)
            if cached is not None and cached.verdict.allowed:
                self._verdicts.discard(key)
        revoked = self._blobs.revoke(repo, manifest)
        if self._children.revoke(repo, manifest):
            self._drop_uncovered()
            revoked = True
        return revoked

    # -- internals ---------------------------------------------------------------------

    def _apply(
        self, repo: RepoKey, manifest: Manifest, decision: Decision, *, fresh: bool, mark: int
    ) -> bool:
        """5. Record (or revoke) what the manifest lets through in this repository.

        False: a sibling refused the manifest after revocation ``mark`` (nothing was
        recorded; decide again).
        """
        digest = manifest.digest
        verdict = decision.verdict
        shared = self._shared
        if not verdict.allowed:
            # Only the refusal that was decided (or that closed something here) is
            # logged for the siblings; a cached one was logged when it was decided.
            closed_here = self._revoke_local(repo, digest)
            if shared is not None and (closed_here or fresh):
                self._revoke_shared(repo, digest)
            return True
        if shared is not None and self._sync() != mark and shared.revoked_since(repo, digest, mark):
            return False
        if decision.would_refuse and self._metrics is not None:
            self._metrics.policy_warnings.labels(verdict.scope).inc()
        elif verdict.mode == "allow" and self._metrics is not None:
            self._metrics.policy_unverified.labels(verdict.scope).inc()
        allowed: dict[int, Iterable[Digest]] = {}
        if not self._blobs.holds(repo, digest, decision.fingerprint):
            allowed[BLOBS] = manifest.blob_digests
        if (
            manifest.is_index
            and decision.verified
            and decision.cover_children
            and not self._children.holds(repo, digest, decision.fingerprint)
        ):
            allowed[CHILDREN] = [child.digest for child in manifest.manifests]
        if not self._share(repo, manifest, allowed, decision, mark):
            return False
        for kind, digests in allowed.items():
            local = self._blobs if kind == BLOBS else self._children
            local.record(
                repo, digest, digests, artifact=manifest.kind, fingerprint=decision.fingerprint
            )
        return True

    def _share(
        self,
        repo: RepoKey,
        manifest: Manifest,
        allowed: dict[int, Iterable[Digest]],
        decision: Decision,
        mark: int,
    ) -> bool:
        """Record ``allowed`` in the shared store, if any; False: a sibling refused the
        manifest after revocation ``mark`` (nothing was recorded)."""
        if self._shared is None or not allowed:
            return True
        try:
            return self._shared.record(
                repo,
                manifest.digest,
                allowed,
                artifact=manifest.kind,
                fingerprint=decision.fingerprint,
                revision=self.revision,
                decided_at=decision.decided_at or self._wall_clock(),
                decision=decision.encode(),
                unless_revoked_after=mark,
            )
        except Exception:
            # Siblings will verify it themselves; this worker still serves it.
            log.exception("could not share the allowances of %s@%s", repo, manifest.digest)
            return True

    def _revoke_shared(self, repo: RepoKey, digest: Digest) -> None:
        assert self._shared is not None
        try:
            seq = self._shared.revoke(repo, digest)
            if seq == self._revocations_seen + 1:
                self._revocations_seen = seq  # our own, applied already
        except Exception:
            log.exception(
                "could not log the refusal of %s@%s for the other workers: they may keep "
                "serving what it allowed until their verdicts expire",
                repo,
                digest,
            )

    async def _decide_once(
        self, key: VerdictKey, policy: Policy, decide: Callable[[], Awaitable[Decision]]
    ) -> Decision:
        """Run ``decide`` and cache its decision under ``key`` (if ``policy`` is still in
        force). Concurrent pulls of one digest share one verification; a caller that goes
        away does not cancel it for the others (shield), and the deadline bounds it."""

        async def decide_and_cache() -> Decision:
            # Dated from the start: the TTL counts from when the material was fetched.
            decided_at = self._wall_clock()
            decision = replace(await decide(), decided_at=decided_at)
            ttl = policy.positive_ttl if decision.verdict.allowed else policy.negative_ttl
            if policy is self._policy:
                self._verdicts.put(key, decision, ttl)
            return decision

        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(decide_and_cache())
            self._inflight[key] = future
            future.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(future)

    def _finished(self, key: VerdictKey, done: asyncio.Future[Decision]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter got it already

    async def _decide(
        self,
        policy: Policy,
        repo: RepoKey,
        manifest: Manifest,
        source: ArtifactSource,
        pod: Pod | None = None,
    ) -> Decision:
        # 3. The most specific scope (for the pod, if any), or the default.
        scope = policy.scope_for(repo, manifest.kind, pod)
        fingerprint = _fingerprint(policy, scope)
        if scope is None:
            return _default_decision(policy, repo, fingerprint)
        if scope.mode == "allow" or scope.require is None:
            log.warning(
                "%s@%s served UNVERIFIED: %s opts out of signature verification",
                repo,
                manifest.digest,
                scope.label(),
            )
            reason = f"{scope.label()}: verification skipped by policy (mode allow)"
            return _decided("unverified", reason, scope.match, "allow", fingerprint)
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
                result = await scope.require.evaluate(
                    subject, source, policy.limits, self._observe_leaf
                )
            outcome = "verified" if result.ok else "refused"
        except TimeoutError:
            outcome = "deadline"
            result = CheckResult(False, f"{DEADLINE_EXCEEDED} ({deadline:g}s)")
        finally:
            # The registry being down is no verdict: it propagates (5xx), never cached.
            if self._metrics is not None:
                self._metrics.verification_seconds.labels(outcome).observe(
                    time.perf_counter() - started
                )
        text = truncate(f"{scope.label()}: {result.reason}")
        if not result.ok and scope.mode == "warn":
            log.warning("mode warn: serving what enforce would refuse: %s", text)
            text = f"would be refused (mode warn): {text}"
            return _decided("warn", text, scope.match, "warn", fingerprint)
        cover = scope.cover_children
        return _decided(outcome, text, scope.match, scope.mode, fingerprint, cover_children=cover)

    def _observe_leaf(self, leaf: Leaf, result: CheckResult) -> None:
        """Per-signer counts: one series per configured requirement (bounded by the
        policy), by format and result."""
        if self._metrics is not None:
            outcome = "verified" if result.ok else "refused"
            self._metrics.signature_checks.labels(leaf.format, leaf.describe(), outcome).inc()

    def _announce(self, policy: Policy, old: Policy | None = None) -> None:
        """Log the policy that went into force (loudly where it serves unverified) and
        move the policy_info metric to it."""
        verb = "loaded" if old is None else f"reloaded (was revision {old.revision[:16]})"
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
        if self._metrics is not None:
            if old is not None:
                self._metrics.policy_info.labels(old.revision[:16], old.source).set(0)
            self._metrics.policy_info.labels(policy.revision[:16], policy.source).set(1)


def _decided(
    reason_class: str,
    reason: str,
    scope: str,
    mode: str,
    fingerprint: str,
    *,
    cover_children: bool = False,
) -> Decision:
    """A decision of ``reason_class`` by ``scope`` (its match, the default or COVERED)
    in ``mode``: "verified", "index" (a verified index covers it), "unverified" (mode or
    default allow) and "warn" (allowed only because of mode or default warn) allow;
    every other class refuses."""
    verified = reason_class in ("verified", "index")
    verdict = Verdict(
        allowed=verified or reason_class in ("unverified", "warn"),
        reason=reason,
        scope=scope,
        mode=mode,
        reason_class=reason_class,
    )
    return Decision(
        verdict,
        verified=verified,
        cover_children=verified and cover_children,
        fingerprint=fingerprint,
        would_refuse=reason_class == "warn",
    )


def _default_decision(policy: Policy, repo: RepoKey, fingerprint: str) -> Decision:
    reason = f"no policy scope matches {repo} and default is {policy.default}"
    if policy.default == "allow":
        log.warning("%s served UNVERIFIED: %s", repo, reason)
        return _decided("unverified", reason, DEFAULT_SCOPE, "allow", fingerprint)
    if policy.default == "warn":
        log.warning("default warn: serving unverified: %s", reason)
        return _decided("warn", reason, DEFAULT_SCOPE, "warn", fingerprint)
    # Anything but an explicit allow/warn refuses: a typo never opens the gate.
    return _decided("no_scope", reason, DEFAULT_SCOPE, "enforce", fingerprint)


def _verdict_key(
    policy: Policy, repo: RepoKey, digest: Digest, pod_scope: Scope | None
) -> VerdictKey:
    """Where a decision is cached: a scope for some pods has keys of its own (its
    decisions are those pods' alone)."""
    revision = policy.revision
    if pod_scope is not None:
        revision = f"{revision}/pod-scope={pod_scope.order}"
    return (repo.registry, repo.repository, str(digest), revision)


def _needs_own_referrers(
    policy: Policy, repo: RepoKey, kind: ArtifactKind | None, pod: Pod | None
) -> bool:
    """Whether the scope of a manifest of ``kind`` requires referrers of it (an SBOM, an
    attestation): an index's signature covers a child's digest, not those, so such a
    child is decided by its own scope."""
    scope = policy.scope_for(repo, kind, pod)
    return (
        scope is not None
        and scope.mode != "allow"
        and scope.require is not None
        and scope.require.needs_referrers
    )


def _fingerprint(policy: Policy, scope: Scope | None) -> str:
    """What a decision depended on: the scope's YAML, the limits and the trust files, or
    the default. A scope not read from a file (built in code) is named by its place in
    this revision of the policy: it never matches under another."""
    if scope is None:
        return f"default {policy.default}"
    if not scope.fingerprint:
        place = next((i for i, s in enumerate(policy.scopes) if s is scope), -1)
        return f"scope {place} of revision {policy.revision} (not from a file)"
    return "\0".join((scope.fingerprint, repr(policy.limits), policy.trust_digest))


_COVERED_DECISION = _decided(
    "index", COVERED_REASON, COVERED, "enforce", COVERED, cover_children=True
)
