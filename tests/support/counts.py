"""Counts the reliability and security suites report at the end of a run (trials,
cases, inputs, clients, violations), printed in pytest's terminal summary."""

from __future__ import annotations

COUNTS: dict[str, int] = {}


def add(name: str, amount: int = 1) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + amount
