"""Private repositories: who may read them, even from the cache.

A node cache serves what it holds to anyone on the node: once one pod pulled a
private image, every pod could. pullgate closes that hole with one rule, applied by
both front ends before anything is served:

* A repository the node's own identity reads (its docker config, or anonymous) is
  served as before: the node's operator decided that the node may have it.
* A repository the upstream refuses the node's identity for is *private*. It is
  marked (in memory and, so that a restart does not forget it, as an empty file named
  after it in the cache directory; the mark holds no secret). A request for it must
  carry credentials (a pod's pull secret through the CRI, or a mirror client's
  ``Authorization``), and they are checked against the upstream with an authenticated
  HEAD, cached or not. An accepted check is remembered for ``ACCEPTED_TTL`` seconds,
  keyed by (registry, repository, a digest of the credentials), in memory only and
  bounded. The request then acts under those credentials upstream (``acting_as``).
* A mark is re-checked with the node's identity after ``MARK_RECHECK`` seconds, so a
  repository made public, or newly covered by the node's credentials, opens again.

Without credentials the answer is ``UNAUTHORIZED`` with a Basic challenge (so a
client that has credentials sends them); with credentials the upstream refuses, it is
``DENIED`` with the upstream's reason. While the upstream cannot be reached, a private
repository is refused (credentials cannot be checked); anything else is served from
the cache as before.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.metrics import Metrics
from proxy.oci import mediatypes as mt
from proxy.oci.errors import CredentialsRequired, Denied, OCIError, Unauthorized
from proxy.oci.reference import upstream_repository
from proxy.pipeline.gate import Pod
from proxy.upstream.auth import Credentials, acting_as, pull_scope
from proxy.upstream.router import Route

log = logging.getLogger("pullgate.access")

T = TypeVar("T")

ACCEPTED_TTL = 60.0
MARK_RECHECK = 60.0
MAX_ACCEPTED = 4096
# Marks kept in memory when they are also on disk (a dropped one is read back from
# its file): a client can have any number of repositories marked, one refusal each.
MAX_PRIVATE_IN_MEMORY = 16384

RepoKey = tuple[str, str]  # (registry, repository)


class RepositoryAccess:
    """The private-repository rule (see the module's docstring), for both front ends."""

    def __init__(self, *, marks_dir: Path | None, metrics: Metrics) -> None:
        self._marks_dir = marks_dir
        if marks_dir is not None:
            marks_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = metrics
        # Private repositories known to this process: when each was last confirmed.
        # Bounded when the marks are on disk; without a marks directory memory is all
        # there is, and forgetting a mark would open the repository.
        self._private: OrderedDict[RepoKey, float] = OrderedDict()
        # Marks whose file could not be written (disk full): kept, never dropped.
        self._unwritten: dict[RepoKey, float] = {}
        # (registry, repository, credentials fingerprint) -> accepted until (monotonic).
        self._accepted: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._checks: dict[tuple[str, str, str], asyncio.Future[OCIError | None]] = {}

    async def guard(
        self,
        route: Route,
        repository: str,
        probe: str,
        credentials: Credentials | None,
        call: Callable[[], Awaitable[T]],
    ) -> T:
        """Run ``call`` (a pipeline call for ``repository``) under the rule.

        ``probe`` is the path under ``/v2/<repository>/`` a HEAD checks access with
        (``manifests/<reference>``, ``blobs/<digest>``; ``tags/list`` is a GET).
        """
        key = (route.registry, repository)
        if not await self._is_private(route, key, probe):
            try:
                return await call()
            except Unauthorized as exc:
                if isinstance(exc, CredentialsRequired):
                    raise
                self._mark(key)
                log.info("repository %s/%s is private: %s", route.registry, repository, exc.message)
                if credentials is None:
                    raise self._required(key, exc.message) from None
        fetch_as = await self._check_credentials(route, repository, probe, credentials)
        with acting_as(fetch_as):
            return await call()

    async def _check_credentials(
        self, route: Route, repository: str, probe: str, credentials: Credentials | None
    ) -> Credentials:
        """The requester's credentials, once the upstream accepted them for a private
        ``repository``; else ``CredentialsRequired`` or ``Denied``."""
        key = (route.registry, repository)
        if credentials is None:
            raise self._required(key, "the upstream refuses the node's own identity")
        checked = (route.registry, repository, credentials.fingerprint)
        until = self._accepted.get(checked)
        if until is not None and until > time.monotonic():
            self._metrics.access_checks.labels("cached").inc()
            return credentials
        refused = await self._single_flight(
            checked, lambda: self._probe(route, repository, probe, credentials)
        )
        if refused is not None:
            self._metrics.access_checks.labels("refused").inc()
            raise Denied(
                f"{route.registry}/{repository} is private and the upstream refused the "
                f"request's credentials: {refused.message}"
            )
        self._metrics.access_checks.labels("accepted").inc()
        self._accepted[checked] = time.monotonic() + ACCEPTED_TTL
        self._accepted.move_to_end(checked)
        while len(self._accepted) > MAX_ACCEPTED:
            self._accepted.popitem(last=False)
        return credentials

    def _required(self, key: RepoKey, why: str) -> CredentialsRequired:
        self._metrics.access_checks.labels("no_credentials").inc()
        return CredentialsRequired(
            f"{key[0]}/{key[1]} is private ({why}) and the request carried no credentials"
        )

    async def _is_private(self, route: Route, key: RepoKey, probe: str) -> bool:
        confirmed = self._private.get(key, self._unwritten.get(key))
        if confirmed is None:
            confirmed = self._read_mark(key)
            if confirmed is None:
                return False
            self._remember_private(key, confirmed)
        if time.time() - confirmed < MARK_RECHECK:
            return True
        # Re-check with the node's own identity: the repository may have opened.
        try:
            refused = await self._single_flight(
                (*key, ""), lambda: self._probe(route, key[1], probe, None)
            )
        except OCIError as exc:  # cannot tell (upstream down): it stays private
            log.info("cannot re-check private repository %s/%s: %s", *key, exc.message)
            return True
        if refused is None:
            self._unmark(key)
            return False
        self._mark(key)
        return True

    async def _probe(
        self, route: Route, repository: str, probe: str, credentials: Credentials | None
    ) -> OCIError | None:
        """HEAD ``probe`` as ``credentials`` (None: the node's identity): None if the
        upstream let it through (a 404 counts: access was granted, the thing is not
        there), the refusal if it did not. Other upstream errors propagate."""
        urepo = upstream_repository(route.registry, repository)
        # The tag list has no HEAD in every registry; it is small.
        method = "GET" if probe.startswith("tags/") else "HEAD"
        headers = {"Accept": mt.ACCEPT_MANIFESTS} if probe.startswith("manifests/") else None
        with acting_as(credentials):
            try:
                response = await route.client.get(
                    f"/v2/{urepo}/{probe}",
                    scope=pull_scope(urepo),
                    method=method,
                    headers=headers,
                )
            except Unauthorized as exc:
                return exc
        response.close()
        return None

    async def _single_flight(
        self, key: tuple[str, str, str], probe: Callable[[], Coroutine[Any, Any, OCIError | None]]
    ) -> OCIError | None:
        """One probe per key at a time, shared by every request that needs it. It runs in
        its own task: a request that goes away does not cancel it for the others."""
        running = self._checks.get(key)
        if running is None:
            running = asyncio.ensure_future(probe())
            self._checks[key] = running
            running.add_done_callback(lambda done: self._probe_done(key, done))
        return await asyncio.shield(running)

    def _probe_done(self, key: tuple[str, str, str], done: asyncio.Future[OCIError | None]) -> None:
        if self._checks.get(key) is done:
            del self._checks[key]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter got it already

    # -- marks on disk --------------------------------------------------------------

    def _mark_path(self, key: RepoKey) -> Path | None:
        if self._marks_dir is None:
            return None
        return self._marks_dir / hashlib.sha256(f"{key[0]}/{key[1]}".encode()).hexdigest()

    def _remember_private(self, key: RepoKey, confirmed: float) -> None:
        self._private[key] = confirmed
        self._private.move_to_end(key)
        if self._marks_dir is not None:
            while len(self._private) > MAX_PRIVATE_IN_MEMORY:
                self._private.popitem(last=False)

    def _mark(self, key: RepoKey) -> None:
        now = time.time()
        path = self._mark_path(key)
        if path is not None:
            try:
                path.touch()
            except OSError as exc:
                log.warning("cannot write the private mark of %s/%s: %s", *key, exc)
                self._private.pop(key, None)
                self._unwritten[key] = now
                return
        self._unwritten.pop(key, None)
        self._remember_private(key, now)

    def _unmark(self, key: RepoKey) -> None:
        self._private.pop(key, None)
        self._unwritten.pop(key, None)
        path = self._mark_path(key)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _read_mark(self, key: RepoKey) -> float | None:
        path = self._mark_path(key)
        if path is None:
            return None
        try:
            return path.stat().st_mtime
        except FileNotFoundError:
            return None


# -- pull grants: a CRI decision carried to the mirror by containerd --------------------

GRANT_USER = "pullgate-pod-pull"
GRANT_TTL_SECONDS = 3600.0
_GRANT_AAD = b"pullgate pull grant v1"


@dataclass(frozen=True, slots=True)
class PullGrant:
    """What the CRI front end decided for one pod's pull, for the mirror requests
    containerd makes for it: the pod (for scopes for pods) and its credentials."""

    registry: str
    repository: str
    digest: str
    pod: Pod | None
    credentials: Credentials | None


class PullGrants:
    """Seals ``PullGrant``s into the Basic credentials containerd forwards to the mirror.

    containerd takes the pull's credentials from the CRI request and sends them to the
    mirror after its 401. The CRI front end replaces them with a grant sealed (AES-GCM)
    under a key only this node's pullgate processes hold, so the mirror learns which
    pod the pull is for, and the pod's own credentials, and nobody can forge either.
    """

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, grant: PullGrant, *, ttl: float = GRANT_TTL_SECONDS) -> Credentials:
        creds = grant.credentials
        doc = {
            "r": grant.registry,
            "p": grant.repository,
            "d": grant.digest,
            "n": None if grant.pod is None else [grant.pod.namespace, list(grant.pod.labels)],
            "e": time.time() + ttl,
            "c": None
            if creds is None
            else [creds.username, creds.password, creds.identity_token, creds.registry_token],
        }
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, json.dumps(doc).encode(), _GRANT_AAD)
        return Credentials(GRANT_USER, base64.urlsafe_b64encode(nonce + sealed).decode())

    def open(self, credentials: Credentials | None) -> PullGrant | None:
        """The grant ``credentials`` carry (None if they are ordinary credentials);
        ``Denied`` if they claim to be a grant and are not a valid, unexpired one."""
        if credentials is None or credentials.username != GRANT_USER:
            return None
        try:
            raw = base64.urlsafe_b64decode(credentials.password.encode())
            doc = json.loads(self._aead.decrypt(raw[:12], raw[12:], _GRANT_AAD))
            inner = doc["c"]
            grant = PullGrant(
                registry=str(doc["r"]),
                repository=str(doc["p"]),
                digest=str(doc["d"]),
                pod=None if doc["n"] is None else _pod(doc["n"]),
                credentials=None if inner is None else Credentials(*map(str, inner)),
            )
            expires = float(doc["e"])
        except (InvalidTag, ValueError, KeyError, TypeError) as exc:
            reason = f"the pull grant is not one this node issued ({type(exc).__name__})"
            raise Denied(reason) from None
        if expires < time.time():
            raise Denied("the pull grant has expired; pull again through the CRI")
        return grant


def _pod(doc: object) -> Pod:
    if not isinstance(doc, list) or len(doc) != 2 or not isinstance(doc[1], list):
        raise ValueError("not a pod")
    namespace, labels = doc
    return Pod(str(namespace), tuple((str(k), str(v)) for k, v in labels))
