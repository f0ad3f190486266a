"""What the per-file check of tar layers knows: the plans, and which layers passed.

A verified model signature gives each tar layer a ``LayerPlan`` (the files it must
hold). The plan is kept here by layer digest, in memory and, with a cache directory,
on disk, so every worker process of the node and a restarted one enforce it: a blob
request may reach a process that did not verify the manifest itself.

A layer that streamed through its check and was committed to the cache is recorded
as having passed that plan (by its fingerprint): a warm hit is then served by
sendfile without parsing it again. A layer refused by its check is remembered (in
this process), so a client's retry is refused at once, with the same reason.

A pass stays true after the blob leaves the cache: the same digest is the same bytes,
and the same plan (by fingerprint) gives the same outcome; a re-fill checks anyway.

Layout under ``root``: ``<hex>.plan.json`` and ``<hex>.<fingerprint>.passed``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.oci.digest import Digest

if TYPE_CHECKING:  # the pipeline imports this module: no import back at run time
    from proxy.pipeline.tarcheck import LayerPlan

log = logging.getLogger("pullgate.cache")

MAX_ENTRIES = 65536


class LayerChecks:
    """Plans by layer digest, passes by (digest, plan fingerprint), refusals."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        self._plans: OrderedDict[Digest, LayerPlan] = OrderedDict()
        self._passed: OrderedDict[tuple[Digest, str], None] = OrderedDict()
        self._refused: OrderedDict[tuple[Digest, str], str] = OrderedDict()

    # -- plans ---------------------------------------------------------------------

    def expect(self, digest: Digest, plan: LayerPlan) -> None:
        """From now on, layer ``digest`` is served only through ``plan``'s check."""
        self._remember(self._plans, digest, plan)
        if self.root is not None:
            _write_atomic(self.root / f"{digest.hex}.plan.json", json.dumps(plan.to_json()))

    def plan_for(self, digest: Digest) -> LayerPlan | None:
        """The plan layer ``digest`` must pass, if a verified signature gave it one."""
        plan = self._plans.get(digest)
        if plan is not None or self.root is None:
            return plan
        try:
            raw = (self.root / f"{digest.hex}.plan.json").read_text()
        except FileNotFoundError:
            return None
        from proxy.pipeline.tarcheck import LayerPlan

        try:
            plan = LayerPlan.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            # Fail closed: a layer that had a plan must not lose it to a broken file.
            log.error("unreadable layer plan for %s: %s", digest, exc)
            raise
        self._remember(self._plans, digest, plan)
        return plan

    # -- facts ---------------------------------------------------------------------

    def record_pass(self, digest: Digest, plan: LayerPlan) -> None:
        """Layer ``digest`` (now in the cache) passed ``plan``'s check."""
        fingerprint = plan.fingerprint()
        self._remember(self._passed, (digest, fingerprint), None)
        if self.root is not None:
            with contextlib.suppress(OSError):
                (self.root / f"{digest.hex}.{fingerprint}.passed").touch()

    def passed(self, digest: Digest, plan: LayerPlan) -> bool:
        """Whether cached layer ``digest`` already passed ``plan``'s check."""
        fingerprint = plan.fingerprint()
        if (digest, fingerprint) in self._passed:
            return True
        if self.root is not None and (self.root / f"{digest.hex}.{fingerprint}.passed").exists():
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
