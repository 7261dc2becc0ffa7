"""A response whose head has arrived: its status and headers, and its body read whole,
as chunks or as lines (SSE) as they arrive.

Closing a :class:`Response` (or leaving its ``async with``) hands the connection back to the
pool when the body was received completely, and closes the socket otherwise; an error or a
timeout while reading the body closes it too.
"""

from __future__ import annotations

from collections import deque
from types import TracebackType

from daemon.http1.connection import DONE, Connection

__all__ = ["Response"]


class Response:
    """A response whose head has arrived; read or stream the body, then close it (or use
    it as an async context manager). Closing hands the connection back to the pool when
    the body was received completely, and closes the socket otherwise."""

    __slots__ = (
        "_conn",
        "_deadline",
        "_headers",
        "_pending",
        "_read_timeout",
        "raw_headers",
        "status",
    )

    def __init__(
        self, conn: Connection, deadline: float | None, read_timeout: float | None
    ) -> None:
        self._conn: Connection | None = conn
        self.status: int = conn._parser.get_status_code()
        self.raw_headers: list[tuple[bytes, bytes]] = conn._raw_headers
        self._headers: dict[str, str] | None = None
        self._deadline = deadline
        self._read_timeout = read_timeout
        self._pending = b""

    @property
    def headers(self) -> dict[str, str]:
        """Header names lower-cased; repeated headers joined with ``", "``."""
        headers = self._headers
        if headers is None:
            headers = {}
            for raw_name, raw_value in self.raw_headers:
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self._headers = headers
        return headers

    async def _next(self) -> bytes | None:
        """The next body chunk, or None at the end of the body."""
        conn = self._conn
        if conn is None:
            return None
        while True:
            chunk = conn.take()
            if chunk is not None:
                return chunk
            if conn._exc is not None:
                exc = conn._exc
                self.close()
                raise exc
            if conn.state == DONE:
                conn.release()
                self._conn = None
                return None
            try:
                await conn._wait(self._deadline, self._read_timeout)
            except BaseException:
                self.close()
                raise

    async def read(self) -> bytes:
        """The whole (remaining) body."""
        conn = self._conn
        if conn is None:
            return b""
        if conn.state == DONE:  # typical small answer: everything arrived with the head
            data = conn.take_all()
            conn.release()
            self._conn = None
            return data
        parts: list[bytes] = []
        while (chunk := await self._next()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def iter_chunks(self) -> _ChunkIterator:
        """Body chunks as they arrive (``async for chunk in resp.iter_chunks()``)."""
        return _ChunkIterator(self)

    def iter_lines(self) -> _LineIterator:
        """Body lines as they arrive, each without its ``\\n`` / ``\\r\\n``; a last line
        without a terminator is yielded too."""
        return _LineIterator(self)

    def close(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.release()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _ChunkIterator:
    __slots__ = ("_resp",)

    def __init__(self, resp: Response) -> None:
        self._resp = resp

    def __aiter__(self) -> _ChunkIterator:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._resp._next()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class _LineIterator:
    __slots__ = ("_buf", "_lines", "_resp")

    def __init__(self, resp: Response) -> None:
        self._resp = resp
        self._buf = b""
        self._lines: deque[bytes] = deque()

    def __aiter__(self) -> _LineIterator:
        return self

    async def __anext__(self) -> bytes:
        lines = self._lines
        while not lines:
            chunk = await self._resp._next()
            if chunk is None:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line[:-1] if line.endswith(b"\r") else line
                raise StopAsyncIteration
            buf = self._buf + chunk if self._buf else chunk
            parts = buf.split(b"\n")
            self._buf = parts.pop()
            for line in parts:
                lines.append(line[:-1] if line.endswith(b"\r") else line)
        return lines.popleft()
