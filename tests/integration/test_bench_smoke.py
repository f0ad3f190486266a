"""The bench harness keeps working: its tiny smoke mode runs every peer and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_reports_every_peer(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    figures = result["figures"]
    for peer in (
        "direct",
        "nginx",
        "proxy-cold",
        "pullgate-cold",
        "pullgate-warm",
        "ctr direct",
        "ctr proxy-cold",
        "ctr pullgate-cold",
        "curl direct",
        "curl pullgate-stream",
        "curl pullgate-cold",
        "workers 1: nginx",
        "workers 1: pullgate cold",
        "workers 1: pullgate warm",
        "workers 2: pullgate warm",
        "workers 2: pullgate warm, resident",
        "floor: sha256 CPU",
        "floor: socket receive+send CPU",
        "floor: new-page write CPU",
        "pullgate-stream CPU",
        "curl pullgate-stream all processes CPU",
        "tls curl direct",
        "tls curl pullgate-stream",
        "tls curl pullgate-stream CPU",
    ):
        assert figures[peer]["samples"], peer
        assert figures[peer]["median"] > 0
    measures = {r["measure"] for r in result["ratios"]}
    assert "stream CPU vs floor (sha256 + receive + send)" in measures
    assert "curl stream vs verifying limit" in measures
    assert "warm resident, 2 workers vs 2 x one worker" in measures
    # Single-flight is a correctness property, so the smoke run checks it exactly.
    assert figures["fan-in upstream GETs"]["samples"] == [1]
    assert "32/32 clients got correct bytes" in result["notes"][0]
    assert figures["verify: cached verdict"]["median"] > 0
    assert any(note.startswith("TLS upstream: pullgate streams at") for note in result["notes"])
    assert (tmp_path / "results.md").read_text().count("|") > 20
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_tarcheck_bench_smoke_reports_both_layers(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.tarcheck", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "tarcheck.json").read_text())
    for layer in ("raw tar", "tar+gzip"):
        for run in ("sha256", "tarcheck", "streamed"):
            assert result[layer][run]["wall_s_per_gib"] > 0, (layer, run)
