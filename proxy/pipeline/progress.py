"""What every reader of a fill watches, whoever does the filling.

A ``Fill`` (this process downloads) and a ``Follow`` (another process does) move
through the same states, ``starting -> running -> committed | failed``, and wake
their readers the same way: each change replaces an event that readers wait on.
"""

from __future__ import annotations

import asyncio


class FillProgress:
    def __init__(self) -> None:
        self.state = "starting"
        self._changed = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.state in ("committed", "failed")

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_change(self) -> None:
        """Until the next change of state or progress."""
        await self._changed.wait()

    async def wait_started(self) -> None:
        while self.state == "starting":
            await self.wait_change()
