"""The log formats of ``serve``: one JSON object per line with the request id where a
request is handled, or text for humans."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway.logs import REQUEST_ID, configure_logging


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_carry_the_request_id_fields_and_tracebacks(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("json", stream)
    log = logging.getLogger("gateway.test")
    log.info("outside any request")
    token = REQUEST_ID.set("abc123")
    try:
        log.warning("inside %s", "one", extra={"fields": {"status": 503}, "summary": "GET / 503"})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    finally:
        REQUEST_ID.reset(token)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first.keys() == {"timestamp", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == (
        "info",
        "gateway.test",
        "outside any request",
    )
    assert second["request_id"] == "abc123" and second["status"] == 503
    assert second["message"] == "GET / 503"
    assert third["level"] == "error" and "RuntimeError: boom" in third["exception"]


def test_text_format_for_humans(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("text", stream)
    token = REQUEST_ID.set("abc123")
    try:
        logging.getLogger("gateway.test").info("hello")
    finally:
        REQUEST_ID.reset(token)
    line = stream.getvalue().strip()
    assert line.endswith("INFO gateway.test [abc123] hello")
    with pytest.raises(ValueError, match="--log-format"):
        configure_logging("xml")
