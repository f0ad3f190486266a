"""Fixtures that start real peers on free loopback ports in per-test temp dirs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fuzzseed import SEED
from tests.support.peers import Containerd, Pullgate, Registry


def pytest_report_header() -> str:
    return f"fuzz seed: PULLGATE_FUZZ_SEED={SEED}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.support.counts import COUNTS

    if COUNTS:
        terminalreporter.section("pullgate suites")
        for name, value in sorted(COUNTS.items()):
            terminalreporter.write_line(f"{name}: {value}")
        failed = len(terminalreporter.stats.get("failed", []))
        terminalreporter.write_line(f"violations (failed tests): {failed}")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    peer = Registry(tmp_path / "registry").start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    peer = Containerd(tmp_path / "containerd").start()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def make_pullgate(tmp_path: Path) -> Iterator[Callable[..., Pullgate]]:
    started: list[Pullgate] = []

    def make(**kwargs: Any) -> Pullgate:
        peer = Pullgate(tmp_path / f"pullgate{len(started)}", **kwargs)
        started.append(peer)
        return peer.start()

    try:
        yield make
    finally:
        for peer in started:
            peer.stop()
