"""``pullgate verify REF``: the gate's verdict for one reference, explained.

It resolves REF upstream and runs the same pipeline and gate as ``pullgate serve``,
so the explanation is the one a refused pull gets. Exit codes: 0 allowed, 1 refused,
2 usage or configuration error, 3 the registry could not be asked.
"""

from __future__ import annotations

import sys

from proxy.cache import NoStore
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.oci.errors import Denied, OCIError
from proxy.oci.reference import ImageReference
from proxy.pipeline import Pipeline
from proxy.upstream.router import UpstreamRouter
from proxy.upstream.session import new_upstream_session
from proxy.verify.base import PolicyError
from proxy.verify.gate import SignatureGate
from proxy.verify.policy import load_policy


async def verify_reference(config: Config, reference_text: str) -> int:
    if config.policy is None:
        print("pullgate verify: --policy FILE is required", file=sys.stderr)
        return 2
    try:
        policy = load_policy(config.policy)
    except PolicyError as exc:
        print(f"pullgate verify: policy error: {exc}", file=sys.stderr)
        return 2
    try:
        reference = ImageReference.parse(
            reference_text, default_registry=config.default_upstream or "docker.io"
        )
    except OCIError as exc:
        print(f"pullgate verify: {exc.message}", file=sys.stderr)
        return 2
    metrics = Metrics()
    gate = SignatureGate(policy, metrics=metrics)
    pipeline = Pipeline(gate=gate, store=NoStore(), metrics=metrics)
    session = new_upstream_session()
    try:
        router = UpstreamRouter(config=config, session=session, metrics=metrics)
        route = router.route(reference.registry)
        served = await pipeline.get_manifest(route, reference.repository, reference.reference)
    except Denied as exc:
        print(f"REFUSED {reference}\n  {exc.code}: {exc.message}")
        return 1
    except OCIError as exc:
        print(f"ERROR {reference}\n  {exc.code}: {exc.message}", file=sys.stderr)
        return 3
    finally:
        await session.close()
        await pipeline.close()
    verdict = served.verdict
    print(f"ALLOWED {reference.registry}/{reference.repository}@{served.manifest.digest}")
    print(f"  mode {verdict.mode}: {verdict.reason}")
    return 0
