"""Log output: text by default, one JSON object per line on request."""

from __future__ import annotations

import json
import logging

import pytest

from proxy.cli import logs


def _one_line(capsys: pytest.CaptureFixture[str], fmt: str, worker: int | None) -> str:
    logs.configure("info", fmt, worker=worker)
    try:
        logging.getLogger("pullgate.access").warning(
            "GET /v2/x -> 403 DENIED: unsigned",
            extra={"fields": {"status": 403, "code": "DENIED", "reason": "unsigned"}},
        )
        logging.getLogger("pullgate.test").debug("below the level: not written")
    finally:
        logs.configure("warning", "text")
    (line,) = capsys.readouterr().err.splitlines()
    return line


def test_json_lines_carry_the_request_fields(capsys: pytest.CaptureFixture[str]) -> None:
    line = json.loads(_one_line(capsys, "json", worker=3))
    assert line["level"] == "warning" and line["logger"] == "pullgate.access"
    assert line["message"] == "GET /v2/x -> 403 DENIED: unsigned"
    assert (line["status"], line["code"], line["reason"]) == (403, "DENIED", "unsigned")
    assert line["worker"] == 3 and line["ts"].endswith("Z")


def test_text_lines_name_the_worker(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line(capsys, "text", worker=1)
    assert " WARNING worker1 pullgate.access: GET /v2/x -> 403 DENIED: unsigned" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
