"""A fence around the writers of a buffer that is about to be let go.

A read may outlive its caller: an S3 request past its timeout keeps running on
the event loop, a Redis batch goes on over its other connections after one
failed, a helper thread is still copying a file. Whoever writes into a
caller's buffer does so inside `writing()`; the caller closes the fence before
it hands the buffer back, and close() waits for the writers already inside
while refusing every later one. After close() returns nothing writes into the
buffer again.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WriteFence:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self._closed = False

    @contextmanager
    def writing(self) -> Iterator[bool]:
        """`with fence.writing() as allowed:` write only if `allowed`."""
        with self._cond:
            allowed = not self._closed
            if allowed:
                self._inside += 1
        try:
            yield allowed
        finally:
            if allowed:
                with self._cond:
                    self._inside -= 1
                    if not self._inside:
                        self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new writers and wait for those inside; False if they were
        still inside after `timeout` (the fence stays closed)."""
        with self._cond:
            self._closed = True
            return self._cond.wait_for(lambda: not self._inside, timeout)
