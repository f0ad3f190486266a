"""Verified manifests and tag resolutions as small files under the cache directory.

Layout under ``root`` (the same directory as the blob store, whose layout this shares
and does not touch)::

    manifests/sha256/<hex>        a verified manifest's exact bytes
    manifests/sha256/<hex>.json   {"mediaType": ..., "verdicts": {repo: verdict}}
    tags/<sha256(repo:tag)>       {"repository", "tag", "digest", "resolvedAt"}

Every file is replaced atomically (written beside its target under a ``.tmp-`` name,
then renamed), and reads re-check what they find: the manifest bytes against their
digest, a tag record against the tag it is named after. A torn write reads as a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy.cache.verified import RecentVerdict, StoredManifest, StoredTag, allowed_at
from proxy.oci.digest import Digest

log = logging.getLogger("pullgate.cache")

TMP_PREFIX = ".tmp-"
# Temp files older than this at startup were left by a crash (a write takes milliseconds;
# a younger one may belong to another process sharing the directory).
STALE_TMP_SECONDS = 60.0


class DiskVerifiedManifests:
    """``VerifiedManifestStore`` on local disk; sha256 manifests only (the layout)."""

    def __init__(self, *, root: Path) -> None:
        self.root = root
        self.manifest_dir = root / "manifests" / "sha256"
        self.tag_dir = root / "tags"

    def recover(self) -> int:
        """Create the layout and remove temp files a crash left behind (how many)."""
        removed = 0
        cutoff = time.time() - STALE_TMP_SECONDS
        for directory in (self.manifest_dir, self.tag_dir):
            directory.mkdir(parents=True, exist_ok=True)
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not entry.name.startswith(TMP_PREFIX):
                        continue
                    with contextlib.suppress(OSError):
                        if entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
        return removed

    def put_manifest(
        self,
        digest: Digest,
        raw: bytes,
        *,
        media_type: str,
        repo: str,
        verdict: Mapping[str, Any],
    ) -> None:
        """Keep a verified manifest and record ``verdict`` for ``repo`` beside it."""
        if digest.algorithm != "sha256":
            return
        path = self.manifest_dir / digest.hex
        meta_path = self.manifest_dir / f"{digest.hex}.json"
        try:
            if not path.exists():
                _write_atomic(path, raw)
            meta = _read_json(meta_path)
            verdicts = meta.get("verdicts")
            if not isinstance(verdicts, dict):
                verdicts = {}
            verdicts[repo] = dict(verdict)
            meta = {"mediaType": media_type, "verdicts": verdicts}
            _write_atomic(meta_path, json.dumps(meta, sort_keys=True).encode())
        except OSError as exc:
            log.warning("could not store manifest %s: %s", digest, exc)

    def get_manifest(self, digest: Digest) -> StoredManifest | None:
        if digest.algorithm != "sha256":
            return None
        try:
            raw = (self.manifest_dir / digest.hex).read_bytes()
        except OSError:
            return None
        meta = _read_json(self.manifest_dir / f"{digest.hex}.json")
        media_type = meta.get("mediaType")
        verdicts = meta.get("verdicts")
        if not digest.matches(raw) or not isinstance(media_type, str):
            return None
        if not isinstance(verdicts, dict):
            return None
        return StoredManifest(
            digest=digest,
            raw=raw,
            media_type=media_type,
            verdicts={k: v for k, v in verdicts.items() if isinstance(v, dict)},
        )

    def recent_verdicts(self, since: float, limit: int) -> list[RecentVerdict]:
        """One listing of the manifest directory; metadata files last written before
        ``since`` are skipped by their mtime without being read."""
        found: list[RecentVerdict] = []
        try:
            entries = list(os.scandir(self.manifest_dir))
        except OSError:
            return []
        for entry in entries:
            stem, _, ext = entry.name.partition(".")
            if ext != "json" or len(stem) != 64 or not _is_hex(stem):
                continue
            try:
                if entry.stat().st_mtime < since:
                    continue
            except OSError:
                continue
            meta = _read_json(Path(entry.path))
            media_type = meta.get("mediaType")
            verdicts = meta.get("verdicts")
            if not isinstance(media_type, str) or not isinstance(verdicts, dict):
                continue
            digest = Digest("sha256", stem)
            for repo, record in verdicts.items():
                if not isinstance(repo, str) or not isinstance(record, dict):
                    continue
                verified_at = allowed_at(record)
                if verified_at is None or verified_at < since:
                    continue
                found.append(RecentVerdict(digest, repo, media_type, verified_at))
        found.sort(key=lambda v: v.verified_at, reverse=True)
        return found[:limit]

    def put_tag(self, repo: str, tag: str, digest: Digest, resolved_at: float) -> None:
        record = {"repository": repo, "tag": tag, "digest": str(digest), "resolvedAt": resolved_at}
        try:
            _write_atomic(self._tag_path(repo, tag), json.dumps(record).encode())
        except OSError as exc:
            log.warning("could not record tag %s:%s: %s", repo, tag, exc)

    def get_tag(self, repo: str, tag: str) -> StoredTag | None:
        record = _read_json(self._tag_path(repo, tag))
        # The file name is a hash: check the record really is this tag's.
        if record.get("repository") != repo or record.get("tag") != tag:
            return None
        resolved_at = record.get("resolvedAt")
        try:
            digest = Digest.parse(str(record.get("digest")))
        except Exception:
            return None
        if not isinstance(resolved_at, (int, float)):
            return None
        return StoredTag(digest=digest, resolved_at=float(resolved_at))

    def _tag_path(self, repo: str, tag: str) -> Path:
        return self.tag_dir / hashlib.sha256(f"{repo}:{tag}".encode()).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    # Beside the target: same filesystem for the rename, and never listed as a record.
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(6)}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
