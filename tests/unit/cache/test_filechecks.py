"""Tar layers' per-file plans and passes (``proxy.cache.filechecks``), on disk for
every worker process of the node."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cache.filechecks import LayerChecks
from proxy.oci.digest import Digest
from proxy.pipeline.tarcheck import LayerPlan

LAYER = Digest.of(b"layer")
PLAN = LayerPlan(compression="gzip", files=(("w/a.bin", "00" * 32),), source="key k")


def test_plan_and_pass_are_seen_by_another_process_on_the_same_directory(tmp_path: Path) -> None:
    writer = LayerChecks(tmp_path / "filechecks")
    writer.expect(LAYER, PLAN)
    writer.record_pass(LAYER, PLAN)
    reader = LayerChecks(tmp_path / "filechecks")
    assert reader.plan_for(LAYER) == PLAN
    assert reader.passed(LAYER, PLAN)
    other = LayerPlan(compression="gzip", files=(("w/a.bin", "11" * 32),))
    assert not reader.passed(LAYER, other), "a pass is for one plan only"


def test_refusal_is_per_plan_and_in_memory() -> None:
    checks = LayerChecks()
    assert checks.plan_for(LAYER) is None
    checks.refuse(LAYER, PLAN, "file w/a.bin has digest ...")
    assert checks.refusal(LAYER, PLAN) == "file w/a.bin has digest ..."
    assert checks.refusal(LAYER, LayerPlan(compression="none", files=())) is None


def test_unreadable_plan_fails_closed(tmp_path: Path) -> None:
    LayerChecks(tmp_path).expect(LAYER, PLAN)
    (tmp_path / f"{LAYER.hex}.plan.json").write_text("{not json")
    with pytest.raises(ValueError):
        LayerChecks(tmp_path).plan_for(LAYER)
