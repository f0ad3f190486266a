"""Tar layers' per-file plans and passes (``proxy.cache.filechecks``), on disk for
every worker process of the node."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_refuses_to_miss_a_plan_another_worker_records_after_a_lookup(tmp_path: Path) -> None:
    # A worker that looked a layer up before its model was verified (no plan then)
    # must see the plan the verifying worker records at its next lookup.
    serving, verifying = LayerChecks(tmp_path), LayerChecks(tmp_path)
    assert serving.plans_for(REPO, LAYER) == ()
    verifying.expect(REPO, LAYER, PLAN)
    assert serving.plans_for(REPO, LAYER) == (PLAN,)
    verifying.expect(REPO, LAYER, OTHER)
    assert set(serving.plans_for(REPO, LAYER)) == {PLAN, OTHER}


def test_a_process_without_a_cache_keeps_plans_in_a_private_directory() -> None:
    checks = LayerChecks()
    try:
        checks.expect(REPO, LAYER, PLAN)
        assert checks.plans_for(REPO, LAYER) == (PLAN,)
        assert checks.root.is_dir()
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
    [path] = (tmp_path / LAYER.hex).glob("*.plan.json")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable layer plan"):
        LayerChecks(tmp_path).plans_for(REPO, LAYER)
