"""Allowances shared by the worker processes of one node.

With ``--workers N`` every worker runs its own ``SignatureGate``. A manifest verified in
one worker must let every worker serve its blobs, and a refusal in one must close, in
all of them, what that manifest allowed. This store is where they meet: one sqlite3
database in WAL mode (readers never wait for the writer) in the node's private runtime
directory. The supervisor creates it empty before the first worker starts and removes
it when the node stops, so it lives exactly as long as the node's process tree, as the
single-process gate's memory does. A worker that restarts finds it as its siblings
left it; a node that restarts starts empty (and the restart restore re-verifies).

What is kept:

- ``grants``: one row per (kind, repository, manifest, fingerprint of the scope that
  decided it: a pod's scope and the scope for everyone keep a row each): what the
  manifest allows (``BLOBS``: its config and layers; ``CHILDREN``: the child manifests a
  verified index covers; ``OFFLINE``: the blobs of a manifest served from the cache while
  the upstream was down), its artifact type, the policy
  revision it was decided under, when, and the decision itself (so a sibling can reuse
  it within the positive verdict TTL instead of verifying again).
- ``entries``: (kind, registry, repository, digest) -> grant, the lookup index.
- ``revocations``: an append-only log of refused (repository, manifest). Each gate
  replays the entries it has not seen into its own memory before it trusts that
  memory, so a refusal anywhere closes the door everywhere.
- ``meta``: the restart-restore marker.
- ``blob_sizes``: (registry, repository, digest) -> size, as the descriptors of the
  manifests a worker served after its gate allowed them say; a sibling serving such
  a blob bounds its upstream body by it (``proxy.pipeline.allowances``).

Whether a grant counts is decided by the reading worker, under its policy in force (see
``SignatureGate``): the store only keeps and finds. Bounded: beyond ``max_manifests``
grants or ``max_entries`` digests the oldest grants go (first in, first out); a gate's
own memory keeps what it imported.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from proxy.oci.digest import Digest
from proxy.oci.manifest import ArtifactKind
from proxy.pipeline.gate import RepoKey

log = logging.getLogger("pullgate.shared")

BLOBS = 0
"""Grant kind: the blobs (config, layers) a manifest allows."""
CHILDREN = 1
"""Grant kind: the child manifests a verified index covers."""
OFFLINE = 2
"""Grant kind: the blobs of a manifest served from the store while its upstream was
unreachable (counted only under the same policy revision)."""

MAX_SHARED_MANIFESTS = 16384
MAX_SHARED_ENTRIES = 131072
MAX_REVOCATIONS = 65536
BUSY_TIMEOUT = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    manifest TEXT NOT NULL,
    artifact_type TEXT,
    fingerprint TEXT NOT NULL,
    revision TEXT NOT NULL,
    decided_at REAL NOT NULL,
    decision TEXT NOT NULL,
    size INTEGER NOT NULL,
    UNIQUE (kind, registry, repository, manifest, fingerprint)
);
CREATE TABLE IF NOT EXISTS entries (
    digest TEXT NOT NULL,
    repository TEXT NOT NULL,
    registry TEXT NOT NULL,
    kind INTEGER NOT NULL,
    grant_seq INTEGER NOT NULL,
    PRIMARY KEY (digest, repository, registry, kind, grant_seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_grant ON entries (grant_seq);
CREATE TABLE IF NOT EXISTS revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    manifest TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS revocations_by_manifest
    ON revocations (manifest, repository, registry);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    grants INTEGER NOT NULL,
    entries INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blob_sizes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    digest TEXT NOT NULL,
    repository TEXT NOT NULL,
    registry TEXT NOT NULL,
    size INTEGER NOT NULL,
    UNIQUE (digest, repository, registry, size)
);
CREATE TRIGGER IF NOT EXISTS grants_added AFTER INSERT ON grants BEGIN
    UPDATE totals SET grants = grants + 1, entries = entries + NEW.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS grants_dropped AFTER DELETE ON grants BEGIN
    UPDATE totals SET grants = grants - 1, entries = entries - OLD.size WHERE id = 0;
    DELETE FROM entries WHERE grant_seq = OLD.seq;
END;
"""

_GRANT_COLUMNS = (
    "g.seq, g.kind, g.registry, g.repository, g.manifest, g.artifact_type, "
    "g.fingerprint, g.revision, g.decided_at, g.decision"
)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one manifest allows in one repository, as recorded by some worker."""

    seq: int
    kind: int
    repo: RepoKey
    manifest: Digest
    artifact: ArtifactKind
    """What the deciding scope was chosen by (stored encoded, column artifact_type)."""
    fingerprint: str
    revision: str
    decided_at: float
    """Wall-clock time of the decision (time.time(): one clock for every worker)."""
    decision: str
    """The deciding gate's encoding of its decision (opaque to the store)."""


def _grant(row: tuple[object, ...]) -> Grant:
    seq, kind, registry, repository, manifest, artifact_type, fp, revision, at, decision = row
    return Grant(
        seq=int(seq),  # type: ignore[call-overload]
        kind=int(kind),  # type: ignore[call-overload]
        repo=RepoKey(str(registry), str(repository)),
        manifest=Digest.parse(str(manifest)),
        artifact=ArtifactKind.decode(None if artifact_type is None else str(artifact_type)),
        fingerprint=str(fp),
        revision=str(revision),
        decided_at=float(at),  # type: ignore[arg-type]
        decision=str(decision),
    )


class SharedAllowances:
    """The node's shared allowance store (one connection per process; not thread-safe).

    Reads are single indexed queries (a few microseconds); writes are short
    ``BEGIN IMMEDIATE`` transactions. Everything runs on the caller's thread: the gate
    calls it from the event loop, where it is as cheap as a dict miss is not, but far
    cheaper than anything else a blob request does.
    """

    def __init__(
        self,
        path: Path,
        *,
        covered_fingerprint: str,
        max_manifests: int = MAX_SHARED_MANIFESTS,
        max_entries: int = MAX_SHARED_ENTRIES,
        max_revocations: int = MAX_REVOCATIONS,
    ) -> None:
        self.path = path
        self._covered = covered_fingerprint
        self._max_manifests = max_manifests
        self._max_entries = max_entries
        self._max_revocations = max_revocations
        self._db = _connect(path)

    @classmethod
    def create(cls, path: Path, *, restore_pending: bool = False) -> None:
        """Make an empty store at ``path`` (the supervisor, before any worker starts)."""
        db = _connect(path)
        try:
            db.executescript(_SCHEMA)
            if restore_pending:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('restore', 'pending')")
        finally:
            db.close()

    def close(self) -> None:
        self._db.close()

    # -- reads -------------------------------------------------------------------------

    def grants_for(self, kind: int, repo: RepoKey, digest: Digest) -> list[Grant]:
        """Grants of ``kind`` in ``repo`` whose manifest allows ``digest``, newest first."""
        rows = self._db.execute(
            f"SELECT {_GRANT_COLUMNS} FROM entries e JOIN grants g ON g.seq = e.grant_seq "
            "WHERE e.digest = ? AND e.repository = ? AND e.registry = ? AND e.kind = ? "
            "ORDER BY g.seq DESC",
            (str(digest), repo.repository, repo.registry, kind),
        ).fetchall()
        return [_grant(row) for row in rows]

    def grant(
        self, kind: int, repo: RepoKey, manifest: Digest, *, fingerprint: str | None = None
    ) -> Grant | None:
        """The newest grant of ``kind`` that ``manifest`` holds in ``repo`` (decided by
        ``fingerprint``, if given), if any."""
        row = self._db.execute(
            f"SELECT {_GRANT_COLUMNS} FROM grants g "
            "WHERE g.kind = ? AND g.registry = ? AND g.repository = ? AND g.manifest = ? "
            "AND (? IS NULL OR g.fingerprint = ?) ORDER BY g.seq DESC LIMIT 1",
            (kind, repo.registry, repo.repository, str(manifest), fingerprint, fingerprint),
        ).fetchone()
        return None if row is None else _grant(row)

    def digests(self, grant: Grant) -> frozenset[Digest]:
        """Every digest ``grant`` allows."""
        rows = self._db.execute(
            "SELECT digest FROM entries WHERE grant_seq = ?", (grant.seq,)
        ).fetchall()
        return frozenset(Digest.parse(str(row[0])) for row in rows)

    def revocation_mark(self) -> int:
        """The sequence number of the newest revocation (0: none yet)."""
        row = self._db.execute("SELECT max(seq) FROM revocations").fetchone()
        return int(row[0] or 0)

    def revocations_after(self, seq: int) -> tuple[list[tuple[RepoKey, Digest]], int, bool]:
        """Revocations newer than ``seq``: (repo, manifest) in order, the newest sequence
        number read, and whether the log still held every one (False: some were trimmed
        and the caller must forget everything it holds)."""
        rows = self._db.execute(
            "SELECT seq, registry, repository, manifest FROM revocations WHERE seq > ? "
            "ORDER BY seq",
            (seq,),
        ).fetchall()
        if not rows:
            return [], seq, True
        complete = int(rows[0][0]) == seq + 1
        revoked = [(RepoKey(str(r[1]), str(r[2])), Digest.parse(str(r[3]))) for r in rows]
        return revoked, int(rows[-1][0]), complete

    def revoked_since(self, repo: RepoKey, manifest: Digest, seq: int) -> bool:
        """Whether ``manifest`` was refused in ``repo`` after revocation ``seq``."""
        row = self._db.execute(
            "SELECT 1 FROM revocations WHERE manifest = ? AND repository = ? AND registry = ? "
            "AND seq > ? LIMIT 1",
            (str(manifest), repo.repository, repo.registry, seq),
        ).fetchone()
        return row is not None

    def blob_sizes(self, repo: RepoKey, digest: Digest) -> frozenset[int]:
        """The sizes served manifests of ``repo`` give blob ``digest`` (usually one)."""
        rows = self._db.execute(
            "SELECT size FROM blob_sizes WHERE digest = ? AND repository = ? AND registry = ?",
            (str(digest), repo.repository, repo.registry),
        ).fetchall()
        return frozenset(int(row[0]) for row in rows)

    def restore_pending(self) -> bool:
        """Whether the node's restart restore has not finished yet."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'restore'").fetchone()
        return row is not None and row[0] == "pending"

    def __len__(self) -> int:
        row = self._db.execute("SELECT grants FROM totals WHERE id = 0").fetchone()
        return int(row[0])

    # -- writes ------------------------------------------------------------------------

    def record(
        self,
        repo: RepoKey,
        manifest: Digest,
        allowed: Mapping[int, Iterable[Digest]],
        *,
        artifact: ArtifactKind,
        fingerprint: str,
        revision: str,
        decided_at: float,
        decision: str,
        unless_revoked_after: int | None = None,
    ) -> bool:
        """Record what ``manifest`` allows in ``repo``, per kind, in one transaction.

        With ``unless_revoked_after``, nothing is recorded (and False returned) if the
        manifest was refused in ``repo`` after that revocation: the caller decided on
        material older than that refusal and must decide again.
        """
        with _Transaction(self._db):
            if unless_revoked_after is not None and self.revoked_since(
                repo, manifest, unless_revoked_after
            ):
                return False
            for kind, digests in allowed.items():
                self._insert(
                    kind,
                    repo,
                    manifest,
                    sorted({str(d) for d in digests}),
                    artifact=artifact,
                    fingerprint=fingerprint,
                    revision=revision,
                    decided_at=decided_at,
                    decision=decision,
                )
            self._evict()
        return True

    def record_sizes(self, repo: RepoKey, sizes: Iterable[tuple[Digest, int]]) -> None:
        """Keep the descriptor sizes of a manifest served from ``repo`` (bounded: the
        oldest rows go beyond ``max_entries``)."""
        rows = [(str(digest), repo.repository, repo.registry, size) for digest, size in sizes]
        if not rows:
            return
        with _Transaction(self._db):
            self._db.executemany(
                "INSERT OR IGNORE INTO blob_sizes (digest, repository, registry, size) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )
            self._db.execute(
                "DELETE FROM blob_sizes WHERE seq <= (SELECT max(seq) FROM blob_sizes) - ?",
                (self._max_entries,),
            )

    def revoke(self, repo: RepoKey, manifest: Digest) -> int:
        """Forget what ``manifest`` allowed in ``repo`` (and the coverage it gave), and
        log the refusal for every worker; returns its sequence number."""
        with _Transaction(self._db):
            self._db.execute(
                "DELETE FROM grants WHERE manifest = ? AND repository = ? AND registry = ?",
                (str(manifest), repo.repository, repo.registry),
            )
            self._drop_uncovered()
            cursor = self._db.execute(
                "INSERT INTO revocations (registry, repository, manifest) VALUES (?, ?, ?)",
                (repo.registry, repo.repository, str(manifest)),
            )
            seq = int(cursor.lastrowid or 0)
            self._db.execute(
                "DELETE FROM revocations WHERE seq <= ?", (seq - self._max_revocations,)
            )
        return seq

    def retain(self, keep: Callable[[Grant], bool]) -> int:
        """Drop every grant (other than index coverage) for which ``keep`` is False, then
        the coverage that no longer has a covering index; returns how many went.

        A policy reload runs this with the new policy's rule. It is not logged as a
        revocation: each worker applies its own policy to its own memory.
        """
        with _Transaction(self._db):
            rows = self._db.execute(f"SELECT {_GRANT_COLUMNS} FROM grants g").fetchall()
            dropped = [
                (g.seq,)
                for g in map(_grant, rows)
                if g.fingerprint != self._covered and not keep(g)
            ]
            self._db.executemany("DELETE FROM grants WHERE seq = ?", dropped)
            return len(dropped) + self._drop_uncovered()

    def finish_restore(self) -> None:
        """Mark the node's restart restore done (waiting workers stop waiting)."""
        with _Transaction(self._db):
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('restore', 'done')")

    # -- internals ---------------------------------------------------------------------

    def _insert(
        self,
        kind: int,
        repo: RepoKey,
        manifest: Digest,
        digests: list[str],
        *,
        artifact: ArtifactKind,
        fingerprint: str,
        revision: str,
        decided_at: float,
        decision: str,
    ) -> None:
        self._db.execute(
            "DELETE FROM grants WHERE kind = ? AND registry = ? AND repository = ? "
            "AND manifest = ? AND fingerprint = ?",
            (kind, repo.registry, repo.repository, str(manifest), fingerprint),
        )
        cursor = self._db.execute(
            "INSERT INTO grants (kind, registry, repository, manifest, artifact_type, "
            "fingerprint, revision, decided_at, decision, size) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                kind,
                repo.registry,
                repo.repository,
                str(manifest),
                artifact.encode(),
                fingerprint,
                revision,
                decided_at,
                decision,
                len(digests),
            ),
        )
        seq = cursor.lastrowid
        self._db.executemany(
            "INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?)",
            ((digest, repo.repository, repo.registry, kind, seq) for digest in digests),
        )

    def _evict(self) -> None:
        """Drop the oldest grants while over either bound (never the newest one)."""
        while True:
            grants, entries = self._db.execute(
                "SELECT grants, entries FROM totals WHERE id = 0"
            ).fetchone()
            if grants <= 1 or (grants <= self._max_manifests and entries <= self._max_entries):
                return
            excess = max(1, grants - self._max_manifests)
            cursor = self._db.execute(
                "DELETE FROM grants WHERE seq IN (SELECT seq FROM grants ORDER BY seq LIMIT ?) "
                "AND seq < (SELECT max(seq) FROM grants)",
                (excess,),
            )
            if cursor.rowcount <= 0:
                return
            self._drop_uncovered()

    def _drop_uncovered(self) -> int:
        """Drop coverage grants whose manifest no covering index lists any more."""
        # A covered child may be an index covering children in turn; digests form no
        # cycles, so this settles within the nesting depth.
        dropped = 0
        while True:
            cursor = self._db.execute(
                "DELETE FROM grants WHERE fingerprint = ? AND NOT EXISTS ("
                "SELECT 1 FROM entries e WHERE e.digest = grants.manifest "
                "AND e.repository = grants.repository AND e.registry = grants.registry "
                "AND e.kind = ?)",
                (self._covered, CHILDREN),
            )
            if cursor.rowcount <= 0:
                return dropped
            dropped += cursor.rowcount


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit
    connection: the write lock is taken up front, so no transaction fails half way."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _connect(path: Path) -> sqlite3.Connection:
    started = time.monotonic()
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    # WAL: readers never wait for the writer. synchronous=OFF: the file lives only as
    # long as the node (a power loss ends the node too); a crashed worker cannot tear
    # a transaction either way.
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA foreign_keys=OFF")
    log.debug("shared allowances %s opened in %.1f ms", path, (time.monotonic() - started) * 1e3)
    return db
