"""What the machine charges per GiB, measured in the same run as the peers.

pullgate cannot move a verified byte for less than hashing it, receiving it from one
socket and sending it to another; a fill also writes it into new page-cache pages.
Each part is measured alone here, in CPU seconds per GiB, so bench can report
pullgate's own CPU next to the floor for its path.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

GIB = 1024**3
PIECE = 1024 * 1024


def sha256_cpu(size: int) -> float:
    """CPU seconds per GiB of hashlib's sha256 over ``size`` bytes (one core)."""
    block = os.urandom(4 * PIECE)
    hasher = hashlib.sha256()
    started = time.process_time()
    for _ in range(max(1, size // len(block))):
        hasher.update(block)
    return (time.process_time() - started) / (size / GIB)


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def socket_copy_cpu(size: int) -> float:
    """CPU seconds per GiB for one thread to receive ``size`` bytes from a loopback
    socket into a reused buffer and send them on to another: the copies any relay
    pays, measured on the relay's thread only."""
    up_send, up_recv = _loopback_pair()
    out_send, out_recv = _loopback_pair()
    block = os.urandom(PIECE)
    pieces = max(1, size // PIECE)

    def produce() -> None:
        for _ in range(pieces):
            up_send.sendall(block)
        up_send.close()

    def consume() -> None:
        view = memoryview(bytearray(PIECE))
        while out_recv.recv_into(view):
            pass

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for thread in threads:
        thread.start()
    view = memoryview(bytearray(PIECE))
    started = time.thread_time()
    while True:
        count = up_recv.recv_into(view)
        if not count:
            break
        out_send.sendall(view[:count])
    cpu = time.thread_time() - started
    out_send.close()
    for thread in threads:
        thread.join()
    up_recv.close()
    out_recv.close()
    return cpu / (pieces * PIECE / GIB)


def new_page_write_cpu(directory: Path, size: int) -> float:
    """CPU seconds per GiB to write ``size`` bytes into a new file (page cache, no
    fsync): what a cache fill pays on top of streaming.

    On this bench's VM it is much higher than on bare metal: the guest reports freed
    memory to the host (free page reporting), so every page the page cache takes for
    new data faults on the host.
    """
    block = os.urandom(2 * PIECE)
    path = directory / "write-probe.bin"
    started = time.process_time()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(max(1, size // len(block))):
            os.write(fd, block)
    finally:
        os.close(fd)
    elapsed = time.process_time() - started
    path.unlink()
    return elapsed / (size / GIB)


def direct_write_cpu(directory: Path, size: int) -> float:
    """CPU seconds per GiB to write ``size`` bytes with ``O_DIRECT`` (what pullgate's
    fills of big blobs pay instead of new page-cache pages); NaN where the
    filesystem refuses ``O_DIRECT``."""
    import mmap

    block = mmap.mmap(-1, 8 * PIECE)
    block.write(os.urandom(8 * PIECE))
    path = directory / "direct-probe.bin"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError:
        return float("nan")
    started = time.process_time()
    try:
        for index in range(max(1, size // len(block))):
            os.pwrite(fd, block, index * len(block))
        os.fsync(fd)
    finally:
        os.close(fd)
        block.close()
    elapsed = time.process_time() - started
    path.unlink()
    return elapsed / (size / GIB)
