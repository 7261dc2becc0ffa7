"""The event-stream parser: bytes in, event data out (WHATWG HTML, event stream
interpretation), whatever the chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.backends.sse import SseError, SseParser


def parse(*chunks: bytes) -> list[bytes]:
    parser = SseParser()
    out: list[bytes] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out + parser.close()


def test_openai_stream() -> None:
    body = b'data: {"a":1}\n\ndata: {"a":2}\n\ndata: [DONE]\n\n'
    assert parse(body) == [b'{"a":1}', b'{"a":2}', b"[DONE]"]


def test_line_endings_are_equivalent() -> None:
    for eol in (b"\n", b"\r\n", b"\r"):
        body = b"data: x" + eol + b"data: y" + eol + eol + b"data: z" + eol + eol
        assert parse(body) == [b"x\ny", b"z"], eol


def test_cr_split_from_its_lf() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the LF completes the CRLF: not a blank line
    assert parser.feed(b"\r\n") == [b"a"]


def test_comments_fields_and_spaces() -> None:
    body = (
        b": keep-alive\n"
        b"event: message\nid: 7\nretry: 100\n"
        b"data:no-space\n"
        b"data:  two-spaces\n"
        b"data\n"  # no colon: the field is data with an empty value
        b"\n"
    )
    assert parse(body) == [b"no-space\n two-spaces\n"]


def test_events_without_data_are_not_dispatched() -> None:
    assert parse(b"event: ping\n\n: comment\n\ndata:\n\n\n\n") == []


def test_bom_is_dropped_even_when_split() -> None:
    assert parse(b"\xef\xbb", b"\xbfdata: x\n\n") == [b"x"]
    assert parse(b"\xef\xbb\xbfdata: x\n\n") == [b"x"]


def test_pending_event_is_dispatched_at_close() -> None:
    assert parse(b"data: [DONE]") == [b"[DONE]"]
    assert parse(b"data: a\ndata: b\r") == [b"a\nb"]


def test_limits() -> None:
    parser = SseParser(max_event_bytes=64)
    with pytest.raises(SseError):
        parser.feed(b"data: " + b"x" * 100)  # one line, no end in sight
    parser = SseParser(max_event_bytes=64)
    with pytest.raises(SseError):
        for _ in range(10):
            parser.feed(b"data: " + b"x" * 10 + b"\n")  # many lines of one event


EVENTS = st.lists(
    st.lists(
        st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b),
        min_size=1,
        max_size=3,
    ),
    max_size=6,
)


@given(
    events=EVENTS,
    eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_any_chunking_gives_the_same_events(
    events: list[list[bytes]], eol: bytes, cuts: list[int]
) -> None:
    body = b"".join(
        b"".join(b"data: " + line + eol for line in lines) + b": c" + eol + eol for lines in events
    )
    expected = [b"\n".join(lines) for lines in events]
    expected = [e for e in expected if e]
    points = sorted({min(c, len(body)) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert parse(*chunks) == expected
    assert parse(body) == expected
