"""Following a fill that another process runs on the same cache directory.

A ``Follow`` shows ``FillReader`` what a ``Fill`` shows it, learned from the filling
process's files instead of its memory, by polling every ``POLL_INTERVAL`` while the fill
makes progress (and less often, up to ``POLL_MAX``, while it does not):

1. where the bytes go and the size the upstream announced: ``ingest/<hex>.info``,
   published once the upstream answered and room was made (readers need the size
   for Content-Length before the body);
2. progress: the size of that ingest file (``fstat`` of our own descriptor of it);
3. the end of the fill: its lock is free again (the filler released it, or died and
   the kernel dropped it);
4. the commit: the blob file in the store is the very file that was followed (same
   device and inode). Only then may readers send the held-back tail; anything else
   (ingest file removed, lock free without that blob) fails every reader.

A filler that died mid-fill leaves its lock file behind: the follower that finds its
lock free removes what it left (never commits it) and fails its readers; the next
request starts a new fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.cache.ingest import FillFiles, FillInfo, reap_locked
from proxy.cache.locks import try_flock
from proxy.oci.digest import Digest
from proxy.oci.errors import OCIError
from proxy.pipeline.progress import FillProgress
from proxy.upstream.client import UpstreamResponse

if TYPE_CHECKING:
    from proxy.pipeline.stream import HeldBackSender

log = logging.getLogger("pullgate.fill")

# Progress reaches followers this late at most while the fill moves; each poll is two
# syscalls. A fill that does not move (the filler waits for its upstream's first byte, a
# slow or stalled upstream) is polled at a doubling interval up to POLL_MAX, back to
# POLL_INTERVAL at the first progress: a waiting follower then costs 20 wake-ups a
# second rather than 100, and one that moves gets every growth as soon as before.
POLL_INTERVAL = 0.01
POLL_MAX = 0.05


class PollBackoff:
    """A follower's poll interval: ``fastest`` while the fill moves; while it does not,
    doubling from there up to ``slowest``."""

    def __init__(self, fastest: float, slowest: float) -> None:
        self.fastest = fastest
        self.slowest = max(fastest, slowest)
        self._next = fastest

    def after(self, *, moved: bool) -> float:
        """Seconds to wait after a poll that saw progress (``moved``) or none."""
        if moved:
            self._next = self.fastest
            return self.fastest
        wait = self._next
        self._next = min(wait * 2, self.slowest)
        return wait


class Follow(FillProgress):
    """A fill of ``digest`` that another process runs, followed through its files."""

    # What a ``Fill`` may report that a follower never does: the filling process
    # handles its own no-room, open errors and full disk.
    no_room = False
    disk_full = False
    open_error: OCIError | None = None
    lead_gone: str | None = None

    def __init__(
        self,
        *,
        digest: Digest,
        files: FillFiles | None,
        poll_interval: float = POLL_INTERVAL,
        poll_max: float = POLL_MAX,
    ) -> None:
        self.digest = digest
        self._files = files
        self.poll_interval = poll_interval
        self.poll_max = poll_max
        self.path: Path | None = None  # the followed ingest file, once known
        self.final_path: Path | None = None
        self.size: int | None = None
        self.written = 0
        super().__init__()
        self.error: str | None = None
        # The filler ended before it published its fill (its upstream failed, it had
        # no room, or it died early): nothing was sent, so the caller may start over.
        self.leader_gone = False
        self.readers = 0
        self.task: asyncio.Task[None] | None = None
        self._lock_fd = -1
        self._data_fd = -1
        self._data_id: tuple[int, int] | None = None

    @classmethod
    def of_committed(cls, *, digest: Digest, path: Path, size: int) -> Follow:
        """A fill another process finished just before ours would have started: the
        blob at ``path`` (nothing left to follow)."""
        follow = cls(digest=digest, files=None)
        follow._committed(size, path)
        return follow

    @property
    def files(self) -> FillFiles:
        assert self._files is not None, "a committed follow has no files to follow"
        return self._files

    def take_bypass(self) -> UpstreamResponse | None:
        return None  # the no-room hand-off happens in the filling process only

    # Only the filling process can feed a reader from memory as bytes arrive: every
    # reader of a followed fill tails the file.

    def claim_lead(self) -> bool:
        return False

    def attach_lead(self, sender: HeldBackSender) -> bool:
        return False

    def decline_lead(self) -> None:
        pass

    def open_for_read(self) -> int:
        """A descriptor of the followed file for one reader (closed by the reader)."""
        if self.state == "committed":
            assert self.final_path is not None
            return os.open(self.final_path, os.O_RDONLY | os.O_CLOEXEC)
        if self._data_fd < 0:
            raise FileNotFoundError(errno.ENOENT, "the followed fill ended", str(self.path))
        # Our own descriptor's file, even if it was renamed into the store meanwhile;
        # it shares our shared lock, so the blob stays pinned while the reader sends.
        return os.dup(self._data_fd)

    async def run(self) -> None:
        try:
            with contextlib.suppress(FileNotFoundError):  # else that fill ended already
                self._lock_fd = os.open(self.files.lock_path, os.O_RDONLY | os.O_CLOEXEC)
            if await self._wait_for_info():
                await self._track()
        except asyncio.CancelledError:
            self._fail("stopped following: every reader went away")
            raise
        except OSError as exc:
            self._fail(f"following the fill of another process failed: {exc}")
        finally:
            for fd in (self._lock_fd, self._data_fd):
                if fd >= 0:
                    os.close(fd)
            self._lock_fd = self._data_fd = -1
            if not self.done:
                self._fail("the followed fill ended without a verified blob")

    async def _wait_for_info(self) -> bool:
        """Wait for the filler to publish its fill; False if it ended first."""
        backoff = PollBackoff(self.poll_interval, self.poll_max)
        while True:
            if not self._filler_alive():
                try:
                    stored = os.stat(self.files.blob_path)
                except FileNotFoundError:
                    self.leader_gone = True
                    self._fail("the filling process ended before it started writing")
                    return False
                self._committed(stored.st_size, self.files.blob_path)  # done before we looked
                return False
            info = self.files.read_info()
            # Alive again after opening: the info was not a dead filler's leftover.
            if info is not None and self._open_data(info) and self._filler_alive():
                self.path = info.ingest_path
                self.size = info.size
                self.state = "running"
                self._notify()
                return True
            await asyncio.sleep(backoff.after(moved=False))

    def _open_data(self, info: FillInfo) -> bool:
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1
        try:
            fd = os.open(info.ingest_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        stat = os.fstat(fd)
        # A shared lock pins it (once committed) against eviction by any process.
        if stat.st_nlink == 0 or not try_flock(fd, shared=True):
            os.close(fd)
            return False
        self._data_fd = fd
        self._data_id = (stat.st_dev, stat.st_ino)
        return True

    async def _track(self) -> None:
        backoff = PollBackoff(self.poll_interval, self.poll_max)
        while True:
            stat = os.fstat(self._data_fd)
            grew = stat.st_size != self.written
            self.written = stat.st_size
            if stat.st_nlink == 0:
                self._fail("the filling process removed its ingest file: its fill failed")
                return
            if not self._filler_alive():
                if not self._is_stored():
                    self._fail("the filling process ended without committing the blob")
                return
            if grew:
                self._notify()
            await asyncio.sleep(backoff.after(moved=grew))

    def _is_stored(self) -> bool:
        """Commit if the store's blob file is the file followed (and whole)."""
        try:
            stored = os.stat(self.files.blob_path)
        except FileNotFoundError:
            return False
        if (stored.st_dev, stored.st_ino) != self._data_id:
            return False
        if self.size is not None and stored.st_size != self.size:
            return False
        self._committed(stored.st_size, self.files.blob_path)
        return True

    def _filler_alive(self) -> bool:
        """Whether the filling process still holds the fill lock. When it does not
        and its lock file is still in place, it died: remove what it left."""
        if self._lock_fd < 0:
            return False
        if not try_flock(self._lock_fd):
            return True
        fd, self._lock_fd = self._lock_fd, -1
        try:
            removed = reap_locked(self.files, fd)
        finally:
            os.close(fd)
        if removed:
            log.warning(
                "the process filling blob %s died; removed the %d files it left",
                self.digest,
                removed,
            )
        return False

    def _committed(self, size: int, path: Path) -> None:
        self.final_path = path
        self.size = self.written = size
        self.state = "committed"
        self._notify()

    def _fail(self, reason: str) -> None:
        self.state = "failed"
        self.error = reason
        if not self.leader_gone:
            log.error(
                "followed fill of blob %s failed: %s; every reader's connection is cut",
                self.digest,
                reason,
            )
        self._notify()
