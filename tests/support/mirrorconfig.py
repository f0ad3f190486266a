"""A pullgate config for one origin with its transports, and images to pull through it.

Shared by the transport and bounded-body suites: ``write_config`` writes the YAML (as
JSON) for ``REGISTRY`` served by ``origin``, ``push`` pushes a two-layer image with
fresh bytes, ``label`` names one Prometheus sample as ``Pullgate.metrics()`` keys it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from tests.support.ocilayout import PushedArtifact, deterministic_bytes, push_image
from tests.support.peers import Registry

REGISTRY = "registry.example.test"
_SEEDS = itertools.count(13_000)


def write_config(
    path: Path,
    origin: str,
    transports: list[dict[str, Any]] | None = None,
    *,
    cache: Path | None = None,
    policy: Path | None = None,
    timeouts: dict[str, Any] | None = None,
) -> Path:
    doc: dict[str, Any] = {
        "upstreams": {REGISTRY: {"url": origin, "transports": transports or []}},
        "defaultUpstream": REGISTRY,
        "unlistedRegistries": "deny",
        "retries": {"attempts": 2, "backoff": 0.05},
    }
    if timeouts is not None:
        doc["timeouts"] = timeouts
    if cache is not None:
        doc["cache"] = {"dir": str(cache), "scrubBytesPerSecond": 0}
    if policy is not None:
        doc["policy"] = str(policy)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def push(origin: Registry, repository: str, *, size: int = 1 << 20) -> PushedArtifact:
    """A large layer of ``size`` fresh bytes and a small one, tagged ``v1``."""
    layers = [deterministic_bytes(size, seed=next(_SEEDS)), b"small layer %d" % next(_SEEDS)]
    return push_image(origin.url, repository, "v1", layers=layers)


def label(name: str, **labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"
