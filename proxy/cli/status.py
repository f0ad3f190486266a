"""``pullgate doctor --admin URL``: the transports of a running pullgate, read from its
``/metrics`` (so every worker's counts are in it), one line per transport:

    transport registry.example.test regional: in use, 4194304 bytes, failovers none, marked none
    transport registry.example.test origin: 1048576 bytes

A transport bypassed right now (marked bad or down) is a finding.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

ORIGIN = "origin"


@dataclass
class TransportLine:
    registry: str
    name: str
    bytes: float = 0.0
    bypassed: bool = False
    failovers: dict[str, float] = field(default_factory=dict)
    marked: dict[str, float] = field(default_factory=dict)

    def render(self) -> str:
        head = f"transport {self.registry} {self.name}:"
        if self.name == ORIGIN:
            return f"{head} {self.bytes:.0f} bytes"
        state = "bypassed" if self.bypassed else "in use"
        return (
            f"{head} {state}, {self.bytes:.0f} bytes, "
            f"failovers {_counts(self.failovers)}, marked {_counts(self.marked)}"
        )


def _counts(values: dict[str, float]) -> str:
    kept = {k: v for k, v in sorted(values.items()) if v}
    return " ".join(f"{k}={v:.0f}" for k, v in kept.items()) or "none"


def read_metrics(admin_url: str, *, timeout: float = 10.0) -> str:
    url = admin_url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text: str = response.read().decode()
    return text


def transport_lines(exposition: str) -> list[TransportLine]:
    """The transports a metrics exposition names, origin last within each registry."""
    lines: dict[tuple[str, str], TransportLine] = {}

    def line(labels: dict[str, str]) -> TransportLine:
        key = (labels.get("registry", ""), labels.get("transport", ""))
        if key not in lines:
            lines[key] = TransportLine(registry=key[0], name=key[1])
        return lines[key]

    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "pullgate_transport_bytes_total":
                line(sample.labels).bytes += sample.value
            elif sample.name == "pullgate_transport_bypassed":
                line(sample.labels).bypassed |= sample.value > 0
            elif sample.name == "pullgate_transport_failovers_total":
                failovers = line(sample.labels).failovers
                reason = sample.labels.get("reason", "")
                failovers[reason] = failovers.get(reason, 0.0) + sample.value
            elif sample.name == "pullgate_transport_marked_bad_total":
                marked = line(sample.labels).marked
                reason = sample.labels.get("reason", "")
                marked[reason] = marked.get(reason, 0.0) + sample.value
    by_registry: dict[str, list[TransportLine]] = defaultdict(list)
    for item in lines.values():
        by_registry[item.registry].append(item)
    ordered: list[TransportLine] = []
    for registry in sorted(by_registry):
        items = by_registry[registry]
        ordered += [i for i in items if i.name != ORIGIN] + [i for i in items if i.name == ORIGIN]
    return ordered


def transport_report(admin_url: str) -> tuple[list[str], list[str]]:
    """(lines to print, findings) for the pullgate at ``admin_url``."""
    try:
        exposition = read_metrics(admin_url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return [], [f"cannot read {admin_url}/metrics: {exc}"]
    items = transport_lines(exposition)
    findings = [
        f"transport {item.name} of {item.registry} is bypassed "
        f"(marked {_counts(item.marked)}); blobs go to the next transport or the origin"
        for item in items
        if item.bypassed
    ]
    if not any(item.name != ORIGIN for item in items):
        return ["no transports configured"], findings
    return [item.render() for item in items], findings
