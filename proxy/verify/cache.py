"""Verdict cache: (registry, repository, digest, policy revision) -> verdict, with TTLs."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from proxy.gate import Verdict

VerdictKey = tuple[str, str, str, str]


class VerdictCache:
    """A bounded LRU with separate lifetimes for allowing and refusing verdicts.

    Keys carry the policy revision, so a reload never serves a verdict made under
    another policy. Lookups are a dict access and a clock read.
    """

    def __init__(
        self,
        *,
        max_entries: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[VerdictKey, tuple[float, Verdict]] = OrderedDict()
        self._max_entries = max_entries
        self._clock = clock

    def get(self, key: VerdictKey) -> Verdict | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, verdict = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return verdict

    def put(self, key: VerdictKey, verdict: Verdict, ttl: float) -> None:
        self._entries[key] = (self._clock() + ttl, verdict)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
