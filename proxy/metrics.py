"""Per-node Prometheus metrics, on a registry the app owns (no module globals).

With several worker processes the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` to a
fresh private directory before any worker starts: every worker then writes its values
to files there (prometheus-client's multiprocess mode), and a scrape of any worker
renders every worker's values together (``exposition``). Counters and histograms add
up across workers (and keep what a worker counted before it died); each gauge says how
it combines (``multiprocess_mode``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self, *, worker: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Set before the process started (prometheus-client reads it at import).
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self._refreshers: list[Callable[[], None]] = []
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
            "pullgate_bytes_served",
            "Blob bytes sent to clients, by source: cache, upstream (uncached), fill (from"
            " the growing cache file), fill_memory (the fill's first reader, from memory)",
            ["source"],
            registry=r,
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
        self.layer_file_checks = Counter(
            "pullgate_layer_file_checks",
            "Per-file checks of tar layers against their model signature: passed and"
            " refused (streamed or from the cache), skipped (a warm hit with its pass"
            " recorded)",
            ["result"],
            registry=r,
        )
        self.upstream_truncated = Counter(
            "pullgate_upstream_truncated",
            "Upstream blob bodies that ended early or broke",
            ["registry"],
            registry=r,
        )
        # ``source``: origin or the transport's name.
        self.upstream_bodies_refused = Counter(
            "pullgate_upstream_bodies_refused",
            "Upstream blob bodies refused by their bounds, by reason: slow (below the"
            " minimum transfer rate, minRate), length (a Content-Length other than the"
            " verified descriptor's size)",
            ["registry", "source", "reason"],
            registry=r,
        )
        # ``front``: which front end asked: mirror (HTTP) or cri (kubelet's PullImage).
        self.verdicts = Counter(
            "pullgate_verdicts", "Manifest verdicts", ["result", "mode", "front"], registry=r
        )
        self.verdict_reasons = Counter(
            "pullgate_verdict_reasons",
            "Manifest verdicts by what decided them: verified, index (covered by a"
            " verified index), unverified (mode allow), warn, refused, deadline, no_scope,"
            " no_policy",
            ["class", "front"],
            registry=r,
        )
        self.denied = Counter(
            "pullgate_denied", "Requests refused by policy", ["kind", "front"], registry=r
        )
        self.streams_active = Gauge(
            "pullgate_blob_streams_active",
            "Blob streams in progress",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.scrubbed = Counter(
            "pullgate_cache_scrubbed_blobs", "Stored blobs re-hashed by the scrub", registry=r
        )
        self.scrub_corrupt = Counter(
            "pullgate_cache_corrupt_blobs",
            "Stored blobs found corrupt and quarantined",
            registry=r,
        )
        # The cache is the node's: the figure last measured by any live worker.
        self.cache_bytes = Gauge(
            "pullgate_cache_bytes",
            "Bytes in the blob cache",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.cache_blobs = Gauge(
            "pullgate_cache_blobs",
            "Blobs in the blob cache",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        # Each worker counts its own evictions; the sum keeps those of dead workers.
        self.cache_evicted = Gauge(
            "pullgate_cache_evicted_blobs",
            "Blobs evicted since start",
            registry=r,
            multiprocess_mode="sum",
        )
        self.access_checks = Counter(
            "pullgate_access_checks",
            "Requests for private repositories, by outcome: accepted, refused (the"
            " upstream refused the credentials), cached (accepted within the TTL),"
            " no_credentials",
            ["result"],
            registry=r,
        )
        self.first_byte = Histogram(
            "pullgate_first_byte_seconds",
            "Time from a request's arrival until its response starts, by kind (manifest,"
            " blob) and source (cache, fill, upstream)",
            ["kind", "source"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.signature_checks = Counter(
            "pullgate_signature_checks",
            "Signature requirements checked, by format (cosign, notation, modelSigning), the"
            " requirement as configured (one series per policy entry) and result",
            ["format", "requirement", "result"],
            registry=r,
        )
        self.fill_joins = Counter(
            "pullgate_fill_joins",
            "Requests that joined a blob fill already under way (single flight), in this"
            " worker or followed from another",
            registry=r,
        )
        self.cache_capacity = Gauge(
            "pullgate_cache_capacity_bytes",
            "Configured cache size limit",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info = Gauge(
            "pullgate_build_info",
            "Always 1; the version",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.policy_info = Gauge(
            "pullgate_policy_info",
            "1 for the revision of the policy in force (0 for one replaced), with its source",
            ["revision", "source"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.fill_bytes = Counter(
            "pullgate_cache_fill_bytes",
            "Blob bytes written into the cache, by how: direct (O_DIRECT, around the page"
            " cache) or page_cache",
            ["io"],
            registry=r,
        )
        self.fills_active = Gauge(
            "pullgate_cache_fills_active",
            "Upstream fills in progress",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.policy_reload_failures = Counter(
            "pullgate_policy_reload_failures", "Policy files refused on reload", registry=r
        )
        self.policy_reloads = Counter("pullgate_policy_reloads", "Policy files loaded", registry=r)
        self.policy_snapshot_in_use = Gauge(
            "pullgate_policy_snapshot_in_use",
            "Workers serving the supervisor's snapshot of the last good policy, because the"
            " policy file did not load when they started",
            registry=r,
            multiprocess_mode="livesum",
        )
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
        self.worker_starts = Counter(
            "pullgate_worker_starts",
            "Serving processes started, by worker slot (restarts: starts - 1)",
            ["worker"],
            registry=r,
        )
        self.worker_responses = Counter(
            "pullgate_worker_responses",
            "Responses started on the registry port, by worker slot",
            ["worker"],
            registry=r,
        )
        # Transports (``upstreams.<name>.transports``): untrusted paths to blob bytes.
        self.transport_bytes = Counter(
            "pullgate_transport_bytes",
            "Blob bytes read, by registry and the transport that served them (origin:"
            " the upstream itself)",
            ["registry", "transport"],
            registry=r,
        )
        self.transport_failovers = Counter(
            "pullgate_transport_failovers",
            "Blob requests that left a transport for the next one (or the origin), by"
            " reason: refused, timeout, first_byte, error, status, not_found, no_length, length"
            " (not the verified size), redirect, skipped"
            " (marked bad or down), hedged (raced by the next after hedgeAfter)",
            ["registry", "transport", "reason"],
            registry=r,
        )
        self.transport_marked_bad = Counter(
            "pullgate_transport_marked_bad",
            "Times a transport was marked bad (digest: served bytes not matching their"
            " digest; broken: a body broken off; slow: below minRate; length: a"
            " Content-Length other than the verified size) or down (refused, timeout,"
            " first_byte, error, status), and bypassed for a while",
            ["registry", "transport", "reason"],
            registry=r,
        )
        self.transport_bypassed = Gauge(
            "pullgate_transport_bypassed",
            "1 while a transport is marked bad or down and bypassed, else 0",
            ["registry", "transport"],
            registry=r,
            # Marks are shared by the workers and refreshed by the one scraped.
            multiprocess_mode="livemostrecent",
        )
        self.worker = str(worker)
        # Bound once: counted on every response.
        self.responses_here = self.worker_responses.labels(self.worker)

    def add_refresher(self, refresh: Callable[[], None]) -> None:
        """Run ``refresh`` before each scrape (and periodically under a supervisor), to
        set gauges that are sampled rather than counted."""
        self._refreshers.append(refresh)

    def refresh(self) -> None:
        for refresh in self._refreshers:
            refresh()

    def exposition(self) -> bytes:
        """The Prometheus text exposition: this process's registry, or every worker's
        files in multiprocess mode."""
        self.refresh()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
