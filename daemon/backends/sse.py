"""An incremental, sans-I/O parser of ``text/event-stream`` (bytes in, event data out).

Follows the WHATWG HTML "event stream interpretation"
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

- lines end with CRLF, LF or CR — a CR at the end of one chunk waits for the next, which may
  start with the LF of the same CRLF;
- a leading UTF-8 BOM is dropped; lines starting with ``:`` are comments;
- ``field: value`` — one space after the colon is dropped; a line without a colon is a field
  with an empty value; only ``data`` matters here (``event``, ``id``, ``retry`` carry nothing
  an OpenAI-compatible stream needs);
- an event's ``data`` lines are joined with LF and dispatched at the blank line that ends it;
  an event with no (or only empty) data is not dispatched.

One deliberate leniency, as in the gateway's upstream client: an event still pending when
the stream ends is dispatched (some servers omit the final blank line after ``[DONE]``).
Lines and events are bounded (``max_event_bytes``), so a misbehaving server cannot make the
parser buffer without limit.
"""

from __future__ import annotations

import re

__all__ = ["SseError", "SseParser"]

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class SseError(ValueError):
    """The stream broke the parser's limits."""


class SseParser:
    """Feed it bytes as they arrive; it returns the ``data`` of every event they complete."""

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._max = max_event_bytes
        self._buffer = b""
        self._data: list[bytes] = []
        self._size = 0
        self._started = False

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._buffer = buffer  # too short to tell whether it is a BOM
                return []
            self._started = True
            buffer = buffer.removeprefix(_BOM)
        events: list[bytes] = []
        start = 0
        for match in _EOL.finditer(buffer):
            if match.end() == len(buffer) and match.group() == b"\r":
                break  # maybe the first half of a CRLF split across chunks
            self._line(buffer[start : match.start()], events)
            start = match.end()
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max:
            raise SseError(f"an event stream line exceeds {self._max} bytes")
        return events

    def close(self) -> list[bytes]:
        """The end of the stream: the data of an event left pending, if any."""
        events: list[bytes] = []
        if self._buffer:
            line, self._buffer = self._buffer.removesuffix(b"\r"), b""
            self._line(line, events)
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                if data:
                    events.append(data)
                self._data = []
                self._size = 0
            return
        if line[0] == 0x3A:  # ":" comment (often a keep-alive)
            return
        name, colon, value = line.partition(b":")
        if name != b"data":
            return
        if colon and value[:1] == b" ":
            value = value[1:]
        self._size += len(value) + 1
        if self._size > self._max:
            raise SseError(f"an event exceeds {self._max} bytes")
        self._data.append(value)
