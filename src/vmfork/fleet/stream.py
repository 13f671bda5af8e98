"""A snapshot's export archive as a stream of chunks, and back.

``ExportStream`` runs ``snapshots.archive.export`` in a thread and hands its output out in
chunks of at most ``CHUNK`` bytes, a few at a time (``DEPTH`` chunks are buffered: the
archive is never held whole in memory, on either side or in between). ``ChunkReader`` is
the file-like object ``snapshots.archive.import_`` reads on the receiving host: it pulls
the next chunk with a function the transport provides. The archive format is the one of
``vmfork snapshot export``: the import unpacks it apart, checks every digest and renames
the snapshot into place, so a stream cut anywhere leaves nothing on the target.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from vmfork.errors import VmforkError, WrongState

CHUNK = 4 << 20
DEPTH = 4
#: A stream nobody read from for this long is abandoned (its reader died): it is closed.
IDLE_S = 120.0


class _Sink:
    """The writable end ``export`` writes to: cuts its output into chunks for the queue."""

    def __init__(self, stream: ExportStream) -> None:
        self.s = stream
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        while len(self.buf) >= CHUNK:
            self.s._put(bytes(self.buf[:CHUNK]))
            del self.buf[:CHUNK]
        return len(data)

    def flush(self) -> None:
        if self.buf:
            self.s._put(bytes(self.buf))
            self.buf.clear()


class ExportStream:
    """One export being read chunk by chunk (``read``), ended by EOF (``b""``) or ``close``."""

    def __init__(self, run: Callable[[Any], dict[str, Any]]) -> None:
        self.q: queue.Queue[bytes | None] = queue.Queue(DEPTH)
        self.closed = threading.Event()
        self.error: BaseException | None = None
        self.result: dict[str, Any] | None = None
        self.sent = 0
        self.touched = time.monotonic()
        self._eof = False
        self.thread = threading.Thread(target=self._run, args=(run,), daemon=True, name="vmfork-export")
        self.thread.start()

    def _put(self, item: bytes | None) -> None:
        """Queue ``item``, waiting while the queue is full; once the stream is closed, drop
        it. The export then runs to its end unread (it cannot be stopped half-way: it
        waits for its tar and zstd, and zstd for its output to be read), and releases the
        snapshot's lock."""
        while not self.closed.is_set():
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self, run: Callable[[Any], dict[str, Any]]) -> None:
        try:
            self.result = run(_Sink(self))
        except BaseException as e:  # handed to the reader
            self.error = e
        finally:
            self._put(None)

    def read(self, timeout: float = 600.0) -> bytes:
        """The next chunk; ``b""`` at the end. Raises what the export raised."""
        self.touched = time.monotonic()
        if self._eof:
            return b""
        try:
            item = self.q.get(timeout=timeout)
        except queue.Empty:
            raise WrongState(f"export produced nothing for {timeout:.0f}s") from None
        self.touched = time.monotonic()
        if item is None:
            self._eof = True
            self.thread.join()
            if self.error is not None:
                raise self.error
            return b""
        self.sent += len(item)
        return item

    def close(self) -> None:
        """The reader is gone: what the export still writes is dropped (see ``_put``)."""
        self.closed.set()
        while True:  # unblock a writer waiting on a full queue
            try:
                self.q.get_nowait()
            except queue.Empty:
                break

    def idle(self) -> bool:
        return time.monotonic() - self.touched > IDLE_S


class ChunkReader:
    """A read-only file over ``fetch`` (returns the next chunk, ``b""`` at the end).
    ``received`` counts the bytes so far (for progress)."""

    def __init__(self, fetch: Callable[[], bytes]) -> None:
        self.fetch = fetch
        self.buf = b""
        self.received = 0
        self.eof = False
        self.error: str | None = None  # why the stream broke, if it did

    def read(self, n: int = -1) -> bytes:
        while not self.eof and (n < 0 or len(self.buf) < n):
            try:
                chunk = self.fetch()
            except VmforkError as e:
                self.error = str(e)
                raise
            except Exception as e:  # the transport's errors, in one line
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                raise WrongState(f"the stream from the source host broke: {self.error}") from None
            if not chunk:
                self.eof = True
                break
            self.received += len(chunk)
            self.buf += chunk
        if n < 0:
            out, self.buf = self.buf, b""
        else:
            out, self.buf = self.buf[:n], self.buf[n:]
        return out
