"""``pullgate prefetch``: ask the node's pullgate to warm its cache, with a progress bar."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO

BAR_WIDTH = 30


def _bar(done: int, total: int) -> str:
    fraction = done / total if total else 1.0
    filled = int(fraction * BAR_WIDTH)
    return (
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction * 100:5.1f}% "
        f"{done / 2**20:,.0f}/{total / 2**20:,.0f} MiB"
    )


def render(event: dict[str, Any], out: TextIO) -> None:
    kind = event.get("kind")
    ref = event.get("reference", "")
    if kind == "progress":
        end = "\n" if not out.isatty() else ""
        prefix = "\r" if out.isatty() else ""
        out.write(
            f"{prefix}{ref} {_bar(event.get('done_bytes', 0), event.get('total_bytes', 0))}{end}"
        )
    elif kind == "manifest":
        out.write(
            f"{ref}: manifest {event.get('digest', '')} verified ({event.get('message', '')})\n"
        )
    elif kind == "skipped":
        out.write(
            f"{ref}: attestation {event.get('digest', '')} refused, not pulled as a platform: "
            f"skipped ({event.get('message', '')})\n"
        )
    elif kind == "blob":
        out.write(f"{ref}: {event.get('message', '')}\n")
    elif kind == "done":
        out.write(
            f"\n{ref}: cached {_bar(event.get('total_bytes', 0), event.get('total_bytes', 0))}\n"
        )
    elif kind == "error":
        out.write(f"\n{ref or 'prefetch'}: FAILED: {event.get('message', '')}\n")
    out.flush()


def run_prefetch(admin_url: str, references: list[str], *, timeout: float) -> int:
    body = json.dumps({"references": references}).encode()
    request = urllib.request.Request(
        admin_url.rstrip("/") + "/admin/prefetch",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    ok = False
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for line in response:
                event = json.loads(line)
                if event.get("kind") == "summary":
                    ok = bool(event.get("ok"))
                    continue
                render(event, sys.stderr)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:500]
        print(f"pullgate prefetch: {exc.code}: {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"pullgate prefetch: cannot reach {admin_url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1
