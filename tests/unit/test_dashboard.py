"""The Grafana dashboard in deploy/grafana loads, and every PromQL expression in it
names metrics pullgate exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from proxy.metrics import Metrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "pullgate-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def _exposed() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def test_dashboard_loads_and_every_expression_names_an_exposed_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert dashboard["uid"] and panels
    exposed = _exposed()
    seen: set[str] = set()
    for panel in panels:
        assert panel["title"] and panel["targets"], panel
        for target in panel["targets"]:
            names = set(re.findall(r"\bpullgate_[a-z_]+", target["expr"]))
            assert names, f"{panel['title']}: no pullgate metric in {target['expr']!r}"
            unknown = names - exposed
            assert not unknown, f"{panel['title']}: {sorted(unknown)} not exposed"
            seen |= names
    # The dashboard shows the verdicts, refusals and bytes an operator watches first.
    assert {"pullgate_verdicts_total", "pullgate_denied_total"} <= seen
    assert {"pullgate_bytes_served_total", "pullgate_cache_capacity_bytes"} <= seen


def test_a_misspelt_metric_would_be_caught() -> None:
    assert "pullgate_verdict_total" not in _exposed()
    assert "pullgate_verdicts_total" in _exposed()
