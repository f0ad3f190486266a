"""Tar layers' per-file plans and passes (``proxy.cache.filechecks``), on disk for
every worker process of the node."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cache import filechecks
from proxy.cache.filechecks import LayerChecks
from proxy.oci.digest import Digest
from proxy.pipeline.gate import RepoKey
from proxy.pipeline.tarcheck import LayerPlan

REPO = RepoKey("registry.example.test", "models/llm")
ELSEWHERE = RepoKey("registry.example.test", "other/llm")

LAYER = Digest.of(b"layer")
PLAN = LayerPlan(compression="gzip", files=(("w/a.bin", "00" * 32),), source="key k")
OTHER = LayerPlan(compression="gzip", files=(("w/a.bin", "11" * 32),), source="key evil")


def test_plan_and_pass_are_seen_by_another_process_on_the_same_directory(tmp_path: Path) -> None:
    writer = LayerChecks(tmp_path / "filechecks")
    writer.expect(REPO, LAYER, PLAN)
    writer.record_pass(LAYER, PLAN)
    reader = LayerChecks(tmp_path / "filechecks")
    assert reader.plans_for(REPO, LAYER) == (PLAN,)
    assert reader.passed(LAYER, PLAN)
    assert not reader.passed(LAYER, OTHER), "a pass is for one plan only"


def test_refuses_to_let_a_second_signature_replace_a_layers_plan(tmp_path: Path) -> None:
    # Another model of the repository naming the same layer adds its plan; the first
    # one stays, so the layer must hold what both signatures say, here and in the
    # next process. A plan made in another repository neither replaces nor joins them.
    checks = LayerChecks(tmp_path)
    checks.expect(REPO, LAYER, PLAN)
    assert checks.plans_for(REPO, LAYER) == (PLAN,)
    checks.expect(REPO, LAYER, OTHER)
    assert set(checks.plans_for(REPO, LAYER)) == {PLAN, OTHER}
    assert set(LayerChecks(tmp_path).plans_for(REPO, LAYER)) == {PLAN, OTHER}
    checks.expect(REPO, LAYER, PLAN)  # the same plan again is one plan
    assert len(LayerChecks(tmp_path).plans_for(REPO, LAYER)) == 2
    assert checks.plans_for(ELSEWHERE, LAYER) == ()
    checks.expect(ELSEWHERE, LAYER, PLAN)
    assert checks.plans_for(ELSEWHERE, LAYER) == (PLAN,)
    assert set(checks.plans_for(REPO, LAYER)) == {PLAN, OTHER}


def test_refuses_to_forget_a_plan_when_memory_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without a cache directory the plans still live on disk (a private directory):
    # a layer whose plan fell out of the bounded memory table must not go unchecked.
    monkeypatch.setattr(filechecks, "MAX_ENTRIES", 2)
    checks = LayerChecks()
    try:
        checks.expect(REPO, LAYER, PLAN)
        assert checks.plans_for(REPO, LAYER) == (PLAN,)
        for n in range(5):
            checks.plans_for(REPO, Digest.of(b"other %d" % n))
        assert checks.plans_for(REPO, LAYER) == (PLAN,)
    finally:
        checks.close()
    assert not checks.root.exists(), "the private directory is removed on close"


def test_refusal_is_per_plan_and_in_memory() -> None:
    checks = LayerChecks()
    try:
        assert checks.plans_for(REPO, LAYER) == ()
        checks.refuse(LAYER, PLAN, "file w/a.bin has digest ...")
        assert checks.refusal(LAYER, PLAN) == "file w/a.bin has digest ..."
        assert checks.refusal(LAYER, LayerPlan(compression="none", files=())) is None
    finally:
        checks.close()


def test_unreadable_plan_fails_closed(tmp_path: Path) -> None:
    LayerChecks(tmp_path).expect(REPO, LAYER, PLAN)
    [path] = tmp_path.glob(f"{LAYER.hex}.*.plan.json")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable layer plan"):
        LayerChecks(tmp_path).plans_for(REPO, LAYER)
