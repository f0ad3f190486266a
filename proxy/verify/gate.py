"""The signature gate: the policy decides every manifest; verified manifests allow blobs.

``SignatureGate`` implements ``proxy.gate.Gate``. For each manifest it

1. returns a cached verdict for (registry, repository, digest, policy revision);
2. lets a child manifest through when a verified index of the same repository covers
   it (scope ``indexes: coverChildren``, the default);
3. picks the most specific scope for the repository and the manifest's artifactType,
   or applies the policy default;
4. evaluates the scope's requirements within the verification deadline;
5. on an allowing verdict, records the blobs (config, layers) and, for an index, the
   child manifests it allows in this repository.

Blob allowances are per repository, so a digest verified in one repository is no
oracle for another. They are cleared when the policy changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from proxy.gate import ArtifactSource, RepoKey, Verdict
from proxy.metrics import Metrics
from proxy.oci.digest import Digest
from proxy.oci.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.oci.manifest import Manifest
from proxy.verify.base import Subject
from proxy.verify.cache import VerdictCache
from proxy.verify.policy import Policy, Scope, truncate

log = logging.getLogger("pullgate.gate")

MAX_REPOSITORIES = 4096
MAX_DIGESTS_PER_REPOSITORY = 65536


class _Allowances:
    """Bounded per-repository sets of digests (LRU over repositories and digests)."""

    def __init__(self) -> None:
        self._repos: OrderedDict[RepoKey, OrderedDict[Digest, None]] = OrderedDict()

    def add(self, repo: RepoKey, digests: frozenset[Digest] | set[Digest]) -> None:
        entries = self._repos.get(repo)
        if entries is None:
            entries = self._repos[repo] = OrderedDict()
        self._repos.move_to_end(repo)
        for digest in digests:
            entries[digest] = None
            entries.move_to_end(digest)
        while len(entries) > MAX_DIGESTS_PER_REPOSITORY:
            entries.popitem(last=False)
        while len(self._repos) > MAX_REPOSITORIES:
            self._repos.popitem(last=False)

    def __contains__(self, item: tuple[RepoKey, Digest]) -> bool:
        repo, digest = item
        entries = self._repos.get(repo)
        return entries is not None and digest in entries

    def clear(self) -> None:
        self._repos.clear()


class SignatureGate:
    def __init__(self, policy: Policy, *, metrics: Metrics | None = None) -> None:
        self._policy = policy
        self._metrics = metrics
        self._verdicts = VerdictCache()
        self._blobs = _Allowances()
        self._children = _Allowances()
        self._log_policy(policy, "loaded")

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def revision(self) -> str:
        return self._policy.revision

    def replace_policy(self, policy: Policy) -> None:
        """Swap in a new policy; verdicts and allowances made under the old one go."""
        if policy.revision == self._policy.revision:
            return
        self._policy = policy
        self._verdicts.clear()
        self._blobs.clear()
        self._children.clear()
        self._log_policy(policy, "reloaded")

    async def check_manifest(
        self, repo: RepoKey, manifest: Manifest, source: ArtifactSource
    ) -> Verdict:
        policy = self._policy
        key = (repo.registry, repo.repository, str(manifest.digest), policy.revision)
        # 1. A verdict made under this policy revision.
        cached = self._verdicts.get(key)
        if cached is None:
            # 2. A child of a verified index that covers its children.
            if (repo, manifest.digest) in self._children:
                cached = Verdict(
                    allowed=True,
                    reason="covered by the signature of a verified index",
                    mode="enforce",
                )
            else:
                cached = await self._decide(policy, repo, manifest, source)
            self._verdicts.put(
                key, cached, policy.positive_ttl if cached.allowed else policy.negative_ttl
            )
        # 5. Record what an allowed manifest lets through, in this repository only.
        if cached.allowed:
            self._blobs.add(repo, manifest.blob_digests)
            scope = policy.scope_for(repo, manifest.effective_artifact_type)
            if manifest.is_index and (scope is None or scope.cover_children):
                self._children.add(repo, {child.digest for child in manifest.manifests})
        return cached

    def blob_allowed(self, repo: RepoKey, digest: Digest) -> bool:
        return (repo, digest) in self._blobs

    async def _decide(
        self, policy: Policy, repo: RepoKey, manifest: Manifest, source: ArtifactSource
    ) -> Verdict:
        # 3. The most specific scope, or the default.
        scope = policy.scope_for(repo, manifest.effective_artifact_type)
        if scope is None:
            return self._default_verdict(policy, repo)
        if scope.mode == "allow":
            log.warning(
                "%s@%s served unverified: %s opts out", repo, manifest.digest, scope.label()
            )
            return Verdict(
                allowed=True,
                reason=f"{scope.label()}: verification skipped by policy",
                scope=scope.match,
                mode="allow",
            )
        assert scope.require is not None
        subject = Subject(
            registry=repo.registry,
            repository=repo.repository,
            digest=manifest.digest,
            media_type=manifest.media_type,
            size=len(manifest.raw),
        )
        # 4. Requirements, within the total verification deadline.
        try:
            async with asyncio.timeout(policy.limits.deadline_seconds):
                result = await scope.require.evaluate(subject, source, policy.limits)
        except TimeoutError:
            return self._scoped(
                scope,
                ok=False,
                reason=f"verification deadline of {policy.limits.deadline_seconds:g}s exceeded",
            )
        except (UpstreamUnavailable, UpstreamTimeout, UpstreamError):
            raise  # the registry is down, not the signature bad: 5xx, never cached
        return self._scoped(scope, ok=result.ok, reason=result.reason)

    def _scoped(self, scope: Scope, *, ok: bool, reason: str) -> Verdict:
        text = truncate(f"{scope.label()}: {reason}")
        if ok:
            return Verdict(allowed=True, reason=text, scope=scope.match, mode=scope.mode)
        if scope.mode == "warn":
            return Verdict(
                allowed=True,
                reason=f"would be refused (mode warn): {text}",
                scope=scope.match,
                mode="warn",
            )
        return Verdict(allowed=False, reason=text, scope=scope.match, mode=scope.mode)

    @staticmethod
    def _default_verdict(policy: Policy, repo: RepoKey) -> Verdict:
        reason = f"no policy scope matches {repo} and default is {policy.default}"
        if policy.default in ("allow", "warn"):
            return Verdict(allowed=True, reason=reason, scope="(default)", mode=policy.default)
        return Verdict(allowed=False, reason=reason, scope="(default)", mode="enforce")

    def _log_policy(self, policy: Policy, verb: str) -> None:
        log.info(
            "policy %s from %s (revision %s): %d scopes, default %s",
            verb,
            policy.source,
            policy.revision,
            len(policy.scopes),
            policy.default,
        )
        for scope in policy.scopes:
            if scope.mode == "allow":
                log.warning("policy: %s skips verification", scope.label())
