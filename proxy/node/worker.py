"""One serving process under the supervisor: ``python -m proxy.node.worker``.

Started by ``proxy.node.supervisor`` with a socketpair as its stdin: it reads its spec
there, builds and serves the node (``proxy.node``), writes ``ready`` once it listens,
and stops gracefully on SIGTERM/SIGINT or when the supervisor goes away.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

from proxy.cli import logs
from proxy.node import Node, serve_node
from proxy.node.config_files import docker_config_or_copy
from proxy.node.supervisor import READY, WorkerSpec, receive_spec
from proxy.verify.base import PolicyError

log = logging.getLogger("pullgate.worker")


def main() -> int:
    channel = socket.socket(fileno=0)
    try:
        spec = receive_spec(channel)
    except (EOFError, OSError, TypeError) as exc:
        print(f"pullgate worker: no spec from the supervisor: {exc}", file=sys.stderr)
        return 1
    logs.configure(spec.config.log_level, spec.config.log_format, worker=spec.role.index)
    config = docker_config_or_copy(spec.config, spec.role.runtime_dir)
    try:
        node = Node.build(config, spec.role)
    except PolicyError as exc:
        print(f"pullgate: policy error: {exc}", file=sys.stderr)
        return 2
    import uvloop

    try:
        uvloop.run(_serve(node, spec, channel))
    except OSError as exc:
        print(f"pullgate worker {spec.role.index}: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(node: Node, spec: WorkerSpec, channel: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    channel.setblocking(False)

    def supervisor_said() -> None:
        try:
            data = channel.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            log.warning("the supervisor went away: stopping")
            loop.remove_reader(channel.fileno())
            stop.set()

    def ready() -> None:
        try:
            channel.send(READY)
        except OSError:
            stop.set()

    loop.add_reader(channel.fileno(), supervisor_said)
    try:
        await serve_node(node, cri=spec.cri, stop=stop, on_ready=ready)
    finally:
        if not stop.is_set():
            loop.remove_reader(channel.fileno())


if __name__ == "__main__":
    sys.exit(main())
