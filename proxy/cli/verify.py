"""``pullgate verify REF``: the gate's verdict for one reference, explained.

It resolves REF upstream and runs the same pipeline and gate as ``pullgate serve``, so
the explanation is the one a refused pull gets. For an index, each child manifest
(platform) is checked too, as a pull would: a child the policy refuses makes the
reference refused. Attestation manifests that buildx puts in an index (platform
``unknown/unknown``, ``vnd.docker.reference.type: attestation-manifest``) are checked
and reported, but do not decide the exit code: containerd never pulls them as a
platform, so a pull of the image does not depend on them.

Exit codes: 0 allowed, 1 refused, 2 usage or configuration error, 3 the registry
could not be asked (unreachable, or it does not have REF).
"""

from __future__ import annotations

import sys
from typing import TextIO

from proxy.cache import NoStore
from proxy.cache.verified import NoVerifiedManifests
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.oci.errors import Denied, NameInvalid, OCIError, RegistryUnknown
from proxy.oci.reference import ImageReference
from proxy.pipeline import Pipeline, ServedManifest
from proxy.pipeline.walk import IndexWalk
from proxy.upstream.router import Route, UpstreamRouter
from proxy.upstream.session import new_upstream_session
from proxy.verify.base import PolicyError
from proxy.verify.policy import load_policy
from proxy.verify.signature_gate import SignatureGate

EXIT_ALLOWED = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UPSTREAM = 3


async def verify_reference(
    config: Config, reference_text: str, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Explain the verdict for ``reference_text`` under ``config.policy``; the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    if config.policy is None:
        print("pullgate verify: --policy FILE is required", file=err)
        return EXIT_USAGE
    try:
        policy = load_policy(config.policy)
    except PolicyError as exc:
        print(f"pullgate verify: policy error: {exc}", file=err)
        return EXIT_USAGE
    try:
        reference = ImageReference.parse(
            reference_text, default_registry=config.default_upstream or "docker.io"
        )
    except OCIError as exc:
        print(f"pullgate verify: {exc.message}", file=err)
        return EXIT_USAGE
    metrics = Metrics()
    gate = SignatureGate(policy, metrics=metrics)
    pipeline = Pipeline(
        gate=gate, store=NoStore(), manifests=NoVerifiedManifests(), metrics=metrics
    )
    session = new_upstream_session()
    try:
        router = UpstreamRouter(config=config, session=session, metrics=metrics)
        try:
            route = router.route(reference.registry)
        except (RegistryUnknown, NameInvalid) as exc:
            print(f"pullgate verify: {exc.message} (give --upstream NAME=URL)", file=err)
            return EXIT_USAGE
        return await _explain(pipeline, route, reference, out, err)
    finally:
        await session.close()
        await pipeline.close()


async def _explain(
    pipeline: Pipeline, route: Route, reference: ImageReference, out: TextIO, err: TextIO
) -> int:
    try:
        served = await pipeline.get_manifest(route, reference.repository, reference.reference)
    except Denied as exc:
        print(f"REFUSED {reference}\n  {exc.code}: {exc.message}", file=out)
        return EXIT_REFUSED
    except OCIError as exc:
        print(f"ERROR {reference}\n  {exc.code}: {exc.message}", file=err)
        return EXIT_UPSTREAM
    name = f"{reference.registry}/{reference.repository}"
    print(f"ALLOWED {name}@{served.manifest.digest}", file=out)
    print(f"  mode {served.verdict.mode}: {served.verdict.reason}", file=out)
    if not served.manifest.is_index:
        return EXIT_ALLOWED
    return await _explain_children(pipeline, route, reference, served, out, err)


async def _explain_children(
    pipeline: Pipeline,
    route: Route,
    reference: ImageReference,
    index: ServedManifest,
    out: TextIO,
    err: TextIO,
) -> int:
    """Check each child of an allowed index as a pull of that platform would."""
    children = IndexWalk(pipeline, route, reference.repository, index.manifest)
    refused = 0
    platforms = 0
    async for outcome in children:
        child = outcome.descriptor
        attestation = outcome.attestation
        platforms += not attestation
        platform = child.platform or {}
        label = "/".join(
            str(platform[k]) for k in ("os", "architecture", "variant") if platform.get(k)
        )
        where = f"  child {child.digest}" + (f" ({label})" if label else "")
        try:
            served = outcome.result()
        except Denied as exc:
            if attestation:
                print(
                    f"{where}: REFUSED (attestation; not pulled as a platform) {exc.message}",
                    file=out,
                )
                continue
            refused += 1
            print(f"{where}: REFUSED {exc.message}", file=out)
            continue
        except OCIError as exc:
            print(f"{where}: ERROR {exc.code}: {exc.message}", file=err)
            return EXIT_UPSTREAM
        print(f"{where}: ALLOWED ({served.verdict.mode}) {served.verdict.reason}", file=out)
    if children.not_checked:
        print(f"  ({children.not_checked} more children not checked)", file=out)
    if refused:
        print(f"REFUSED {reference}: {refused} of {platforms} platform manifests", file=out)
        return EXIT_REFUSED
    return EXIT_ALLOWED
