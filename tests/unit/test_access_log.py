"""The access log: JSON lines with the keys every other log line has, written once per
event-loop turn; through ``logging`` when logging is set up any other way."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import Iterator

import pytest

from gateway import logs
from gateway.ids import new_hex_id
from gateway.logs import AccessLog, JsonFormatter, configure_logging


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    names = ("lattice", "billing", "daemon")
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    configure_logging("info", json=True)
    yield buf
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    monkeypatch.setattr(logs, "_json_handler", None)


def only_json_lines() -> None:
    """Drop the capture handlers pytest adds for the test's duration: the JSON lines of
    configure_logging are then the only destination, as in a running gateway."""
    assert logs._json_handler is not None
    logging.getLogger("lattice").handlers[:] = [logs._json_handler]


async def test_lines_of_one_loop_turn_are_written_together_with_the_usual_keys(
    stderr: io.StringIO,
) -> None:
    only_json_lines()
    access = AccessLog()
    access.record("POST", "/v1/chat/completions", 200, 0.512, "req_a")
    access.record("GET", "/v1/models", 404, 0.1, "req_b")
    assert stderr.getvalue() == ""  # nothing written on the request path
    await asyncio.sleep(0)
    lines = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["req_a", "req_b"]
    first = lines[0]
    assert first["msg"] == "request" and first["level"] == "info"
    assert first["logger"] == "lattice.access"
    assert (first["method"], first["path"], first["status"]) == (
        "POST",
        "/v1/chat/completions",
        200,
    )
    assert first["duration_ms"] == 0.512
    # the same keys a line of the standard formatter carries
    record = logging.makeLogRecord({"name": "lattice.access", "levelname": "INFO", "msg": "x"})
    standard = json.loads(JsonFormatter().format(record))
    assert set(standard) <= set(first)
    assert first["ts"].endswith("Z") and len(first["ts"]) == len(standard["ts"])


def test_without_a_loop_the_line_is_written_at_once(stderr: io.StringIO) -> None:
    only_json_lines()
    AccessLog().record("GET", "/healthz", 200, 0.2, "req_c")
    assert json.loads(stderr.getvalue())["request_id"] == "req_c"


def test_other_logging_set_ups_get_standard_records(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lattice.access"):
        AccessLog().record("GET", "/v1/models", 200, 1.5, "req_d")
    [rec] = [r for r in caplog.records if r.name == "lattice.access"]
    assert rec.getMessage() == "request" and rec.__dict__["status"] == 200


def test_nothing_below_the_level(stderr: io.StringIO) -> None:
    only_json_lines()
    logging.getLogger("lattice").setLevel(logging.WARNING)
    AccessLog().record("GET", "/v1/models", 200, 1.5, "req_e")
    assert stderr.getvalue() == ""


def test_ids_are_unique_hex_and_differ_after_fork() -> None:
    ids = {new_hex_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child draws a new key: its ids are not the parent's next ones
        os.write(write, new_hex_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child not in ids and child != new_hex_id()
