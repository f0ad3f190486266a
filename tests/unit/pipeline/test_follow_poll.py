"""The follower's poll interval: fast while the followed fill moves, slower while not."""

from __future__ import annotations

from proxy.pipeline.follow import PollBackoff


def test_a_stalled_fill_is_polled_less_often_up_to_the_bound() -> None:
    backoff = PollBackoff(0.01, 0.05)
    waits = [backoff.after(moved=False) for _ in range(6)]
    assert waits == [0.01, 0.02, 0.04, 0.05, 0.05, 0.05]


def test_progress_brings_the_poll_back_to_its_fastest() -> None:
    backoff = PollBackoff(0.01, 0.05)
    for _ in range(5):
        backoff.after(moved=False)
    assert backoff.after(moved=True) == 0.01
    # A fill that keeps moving is polled at the fastest interval throughout.
    assert {backoff.after(moved=True) for _ in range(10)} == {0.01}
    # And a stall after progress starts again from the fastest.
    assert backoff.after(moved=False) == 0.01
    assert backoff.after(moved=False) == 0.02


def test_a_bound_below_the_fastest_interval_is_the_fastest() -> None:
    backoff = PollBackoff(0.05, 0.01)
    assert [backoff.after(moved=False) for _ in range(3)] == [0.05, 0.05, 0.05]
