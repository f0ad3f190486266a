"""Per-node Prometheus metrics, on a registry the app owns (no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pullgate_requests",
            "Client requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "pullgate_request_duration_seconds",
            "Time to response headers, by endpoint",
            ["endpoint"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
        )
        self.bytes_served = Counter(
            "pullgate_bytes_served", "Blob bytes sent to clients", ["source"], registry=r
        )
        self.upstream_bytes = Counter(
            "pullgate_upstream_bytes", "Blob bytes read from upstreams", ["registry"], registry=r
        )
        self.upstream_requests = Counter(
            "pullgate_upstream_requests",
            "Requests sent upstream",
            ["registry", "status"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "pullgate_upstream_retries",
            "Upstream requests retried",
            ["registry", "reason"],
            registry=r,
        )
        self.digest_mismatch = Counter(
            "pullgate_blob_digest_mismatch",
            "Blobs whose bytes did not match their digest",
            ["registry"],
            registry=r,
        )
        self.upstream_truncated = Counter(
            "pullgate_upstream_truncated",
            "Upstream blob bodies that ended early or broke",
            ["registry"],
            registry=r,
        )
        self.verdicts = Counter(
            "pullgate_verdicts", "Manifest verdicts", ["result", "mode"], registry=r
        )
        self.denied = Counter("pullgate_denied", "Requests refused by policy", ["kind"], registry=r)
        self.streams_active = Gauge(
            "pullgate_blob_streams_active", "Blob streams in progress", registry=r
        )
        self.scrubbed = Counter(
            "pullgate_cache_scrubbed_blobs", "Stored blobs re-hashed by the scrub", registry=r
        )
        self.scrub_corrupt = Counter(
            "pullgate_cache_corrupt_blobs",
            "Stored blobs found corrupt and quarantined",
            registry=r,
        )
        self.cache_bytes = Gauge("pullgate_cache_bytes", "Bytes in the blob cache", registry=r)
        self.cache_blobs = Gauge("pullgate_cache_blobs", "Blobs in the blob cache", registry=r)
        self.cache_evicted = Gauge(
            "pullgate_cache_evicted_blobs", "Blobs evicted since start", registry=r
        )
        self.fills_active = Gauge(
            "pullgate_cache_fills_active", "Upstream fills in progress", registry=r
        )
        self.policy_reload_failures = Counter(
            "pullgate_policy_reload_failures", "Policy files refused on reload", registry=r
        )
        self.policy_reloads = Counter("pullgate_policy_reloads", "Policy files loaded", registry=r)
        self.verification_seconds = Histogram(
            "pullgate_verification_duration_seconds",
            "Time to decide a manifest's signatures on a verdict-cache miss, by outcome",
            ["outcome"],
            registry=r,
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 30),
        )
        self.verdict_cache = Counter(
            "pullgate_verdict_cache_lookups",
            "Gate verdict-cache lookups (hit or miss)",
            ["result"],
            registry=r,
        )
        self.policy_warnings = Counter(
            "pullgate_policy_warn_served",
            "Manifests served under mode warn (or default warn) that enforce would refuse",
            ["scope"],
            registry=r,
        )
        self.policy_unverified = Counter(
            "pullgate_policy_allow_served",
            "Manifests served unverified because a scope or the default says allow",
            ["scope"],
            registry=r,
        )
