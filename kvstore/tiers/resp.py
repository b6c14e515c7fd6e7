"""Reading pipelined RESP replies straight from a socket.

redis-py's parser copies a bulk reply several times on its way to a bytes
object and reads about 0.3 GB/s on loopback; recv_into the destination reads
about 1 GB/s, the server's own pace. This reader hands the bulk strings of an
array reply to the caller as one bounded stream (read / readinto), so a
block's payload goes from the socket into its tensor in one copy.
"""
from __future__ import annotations

import socket

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from ..buffers import ReadintoStream

_CHUNK = 1 << 16


class ReplyReader:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()  # bytes received ahead of the current position
        self.remaining = 0  # bytes of the current bulk string not yet consumed

    def _receive(self) -> None:
        chunk = self._sock.recv(_CHUNK)
        if not chunk:
            raise RedisConnectionError("connection closed while reading a reply")
        self._buffer += chunk

    def _header(self, kind: bytes) -> int | None:
        """Read the next reply header of `kind` (b'*' array, b'$' bulk): its length, None for nil."""
        while (end := self._buffer.find(b"\r\n")) < 0:
            self._receive()
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 2]
        if line[:1] == kind:
            size = int(line[1:])
            return None if size < 0 else size
        if line == b"_":  # RESP3 null
            return None
        if line[:1] == b"-":
            raise ResponseError(line[1:].decode(errors="replace"))
        raise RedisConnectionError(f"unexpected reply {line[:40]!r}")

    def open_array(self) -> int | None:
        return self._header(b"*")

    def open_bulk(self) -> int | None:
        size = self._header(b"$")
        self.remaining = size or 0
        return size

    def readinto(self, view) -> int:
        """Read from the current bulk string into `view`; 0 at its end."""
        view = memoryview(view).cast("B")[: self.remaining]
        if not len(view):
            return 0
        if self._buffer:
            n = min(len(view), len(self._buffer))
            view[:n] = self._buffer[:n]
            del self._buffer[:n]
        else:
            n = self._sock.recv_into(view)
            if not n:
                raise RedisConnectionError("connection closed while reading a reply")
        self.remaining -= n
        return n

    def close_bulk(self) -> None:
        """Skip what is left of the current bulk string, and its CRLF."""
        scratch = bytearray(min(self.remaining, _CHUNK) or 1)
        while self.remaining:
            self.readinto(scratch)
        while len(self._buffer) < 2:
            self._receive()
        if self._buffer[:2] != b"\r\n":
            raise RedisConnectionError("bulk string not followed by CRLF")
        del self._buffer[:2]

    @property
    def drained(self) -> bool:
        """True when nothing was received beyond the replies consumed."""
        return not self._buffer


class ArrayStream(ReadintoStream):
    """The bulk strings of one array reply, read back to back as one stream
    that ends early at a nil element (a missing piece)."""

    def __init__(self, reader: ReplyReader, count: int) -> None:
        self._reader = reader
        self._left = count  # elements not opened yet
        self._open = False
        self._ended = False

    def _next(self) -> bool:
        """Move to the next element with bytes left; False at the end of the stream."""
        while not self._ended:
            if self._open and self._reader.remaining:
                return True
            if self._open:
                self._reader.close_bulk()
                self._open = False
            if not self._left:
                self._ended = True
                break
            self._left -= 1
            if self._reader.open_bulk() is None:
                self._ended = True  # a nil piece: the stream is short from here
            else:
                self._open = True
        return False

    def readinto(self, view) -> int:
        return self._reader.readinto(view) if self._next() else 0

    def present(self) -> bool:
        """Open the first element; False when it is nil (the whole object is absent)."""
        if not self._left:
            return False
        self._left -= 1
        if self._reader.open_bulk() is None:
            self._ended = True
            return False
        self._open = True
        return True

    def finish(self) -> None:
        """Consume what is left of the reply, so the next reply can be read."""
        if self._open:
            self._reader.close_bulk()
            self._open = False
        for _ in range(self._left):
            if self._reader.open_bulk() is not None:
                self._reader.close_bulk()
        self._left = 0
        self._ended = True
