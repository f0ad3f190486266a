"""What the per-file check of tar layers knows: the plans, and which layers passed.

A verified model signature gives each tar layer a ``LayerPlan`` (the files it must
hold). Plans are kept by layer digest on disk (with the cache, else in the workers'
shared runtime directory, else in a private one), so every worker process of the node
and a restarted one enforce them: a blob request may reach a process that did not
verify the manifest itself.

Plans are per repository, as blob allowances are: a layer is served in a repository
only if it holds what every verified signature there that names it says. A later
signature adds its plan, it never replaces one, and a signature in another repository
(another scope, another signer) neither stands in for a plan here nor blocks the layer
here. Whether a layer passed a plan is a fact about its bytes, shared by all.

A layer that streamed through its check and was committed to the cache is recorded
as having passed that plan (by its fingerprint): a warm hit is then served by
sendfile without parsing it again. A layer refused by its check is remembered (in
this process), so a client's retry is refused at once, with the same reason.

A pass stays true after the blob leaves the cache: the same digest is the same bytes,
and the same plan (by fingerprint) gives the same outcome; a re-fill checks anyway.

Layout under ``root``: ``<hex>/<repository id>.<fingerprint>.plan.json`` and
``<hex>.<fingerprint>.passed``. Plans are read from disk at each blob request (a
missing directory for a layer without plans), never from a memory of them: a plan
another worker records counts at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.oci.digest import Digest

if TYPE_CHECKING:  # the pipeline imports this module: no import back at run time
    from proxy.pipeline.gate import RepoKey
    from proxy.pipeline.tarcheck import LayerPlan

log = logging.getLogger("pullgate.cache")

MAX_ENTRIES = 65536


class LayerChecks:
    """Plans by layer digest (every plan a verified signature gave it), passes by
    (digest, plan fingerprint), refusals."""

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            # Never memory alone: plans are read from disk at each use. A process of its
            # own keeps them in a private directory.
            root = Path(tempfile.mkdtemp(prefix="pullgate-filechecks-"))
            self._owned: Path | None = root
        else:
            root.mkdir(parents=True, exist_ok=True)
            self._owned = None
        self.root = root
        self._passed: OrderedDict[tuple[Digest, str], None] = OrderedDict()
        self._refused: OrderedDict[tuple[Digest, str], str] = OrderedDict()

    def close(self) -> None:
        """Remove the private directory, if this object made one."""
        if self._owned is not None:
            shutil.rmtree(self._owned, ignore_errors=True)

    # -- plans ---------------------------------------------------------------------

    def expect(self, repo: RepoKey, digest: Digest, plan: LayerPlan) -> None:
        """From now on, layer ``digest`` is served in ``repo`` only through ``plan``'s
        check, and those of every other signature in ``repo`` that named it."""
        directory = self.root / digest.hex
        directory.mkdir(exist_ok=True)
        name = f"{_repo_id(repo)}.{plan.fingerprint()}.plan.json"
        _write_atomic(directory / name, json.dumps(plan.to_json()))

    def plans_for(self, repo: RepoKey, digest: Digest) -> tuple[LayerPlan, ...]:
        """The plans layer ``digest`` must pass in ``repo`` (none: not a checked layer).

        Read from disk every time (one failed lookup for a layer without plans): a
        plan another worker records must count here at once, so none is remembered.
        Raises ``ValueError`` (fail closed) if a plan file cannot be read."""
        from proxy.pipeline.tarcheck import LayerPlan

        prefix = f"{_repo_id(repo)}."
        try:
            with os.scandir(self.root / digest.hex) as entries:
                names = sorted(
                    e.name
                    for e in entries
                    if e.name.startswith(prefix) and e.name.endswith(".plan.json")
                )
        except FileNotFoundError:
            return ()
        found = []
        for name in names:
            path = self.root / digest.hex / name
            try:
                found.append(LayerPlan.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Fail closed: a layer that had a plan must not lose it to a broken file.
                log.error("unreadable layer plan %s: %s", path, exc)
                raise ValueError(f"unreadable layer plan {digest.hex}/{name}") from exc
        return tuple(found)

    # -- facts ---------------------------------------------------------------------

    def record_pass(self, digest: Digest, plan: LayerPlan) -> None:
        """Layer ``digest`` (now in the cache) passed ``plan``'s check."""
        fingerprint = plan.fingerprint()
        self._remember(self._passed, (digest, fingerprint), None)
        with contextlib.suppress(OSError):
            (self.root / f"{digest.hex}.{fingerprint}.passed").touch()

    def passed(self, digest: Digest, plan: LayerPlan) -> bool:
        """Whether cached layer ``digest`` already passed ``plan``'s check."""
        fingerprint = plan.fingerprint()
        if (digest, fingerprint) in self._passed:
            return True
        if (self.root / f"{digest.hex}.{fingerprint}.passed").exists():
            self._remember(self._passed, (digest, fingerprint), None)
            return True
        return False

    def refuse(self, digest: Digest, plan: LayerPlan, reason: str) -> None:
        """Layer ``digest`` failed ``plan``'s check: later requests are refused at once."""
        self._remember(self._refused, (digest, plan.fingerprint()), reason)

    def refusal(self, digest: Digest, plan: LayerPlan) -> str | None:
        return self._refused.get((digest, plan.fingerprint()))

    @staticmethod
    def _remember(table: OrderedDict, key: object, value: object) -> None:  # type: ignore[type-arg]
        table[key] = value
        table.move_to_end(key)
        while len(table) > MAX_ENTRIES:
            table.popitem(last=False)


def _repo_id(repo: RepoKey) -> str:
    return hashlib.sha256(f"{repo.registry}/{repo.repository}".encode()).hexdigest()[:32]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".plan-")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
