"""gunicorn's gthread worker, with a time limit on reading each request (``HeaderFirstWorker``).

gunicorn's gthread worker hands a connection to a thread as soon as its first bytes arrive, and
the thread then reads the request line and headers with blocking ``recv`` calls and no time
limit. A client that sends half a request and then a byte now and then holds that thread for as
long as it likes: 16 such clients took all 16 threads and ``/healthz`` stopped answering.

This worker reads the header block in the worker's main loop instead, non-blocking, from the
selector gunicorn already keeps its idle keep-alive connections in. A connection reaches the
thread pool only once a whole header block (up to the blank line) has arrived, so a slow client
holds a descriptor and a few bytes of buffer, never a thread. Whatever has not sent its whole
header block ``header_timeout_s`` after its first byte could be read (a new connection, or the
next request on a kept-alive one) is closed without an answer, as nginx does on
``client_header_timeout``.

The body is read by the thread, as before, under a deadline: ``body_timeout_s`` for the whole
body, counted from the moment the headers were complete (a per-``recv`` timeout would let a
client that trickles a byte a second keep the thread forever). A read past the deadline raises
``TimeoutError`` inside the app, which answers 408 (zswarm/http/app.py).

It relies on gthread's internals as of gunicorn 27 (``enqueue_req``, ``murder_pending``, the
``poller``); gunicorn_conf.py falls back to plain gthread on an older gunicorn, and TLS (which
zswarm's own gunicorn never serves) is left to gthread unchanged.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from collections import deque
from functools import partial

from gunicorn.workers.gthread import ThreadWorker

# Seconds a client has to send a whole request line and headers (from its first readable byte).
# OpenAI clients send them in one packet; 10 s covers a very slow link and bounds an attacker.
HEADER_TIMEOUT_S = float(os.environ.get("ZSWARM_HTTP_HEADER_TIMEOUT_S", "10"))
# Seconds for a whole request body once the headers are in: the app takes at most 1 MiB, which
# crosses a 1 Mbit/s link in about 8 s.
BODY_TIMEOUT_S = float(os.environ.get("ZSWARM_HTTP_BODY_TIMEOUT_S", "30"))
# A header block larger than this is refused with 431 before any thread sees it (gunicorn's own
# limits, limit_request_line and limit_request_fields, still apply to what is smaller).
MAX_HEAD_BYTES = 64 * 1024

_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
              b"Content-Type: application/json\r\nContent-Length: 93\r\n\r\n"
              b'{"error":{"message":"The request headers are too large.","type":"invalid_request_error"}}\n')


def _head_complete(buf: bytes | bytearray) -> bool:
    return b"\r\n\r\n" in buf or b"\n\n" in buf


class DeadlineReads:
    """What gunicorn's parser reads the socket through: each ``recv`` waits at most until
    ``deadline`` (monotonic seconds; None: no limit), then raises ``TimeoutError``. Everything
    else (``settimeout``, ``gettimeout``, which gunicorn's body drain uses) goes to the socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline: float | None = None

    def recv(self, size: int) -> bytes:
        if self.deadline is None:
            return self.sock.recv(size)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not read in time")
        prior = self.sock.gettimeout()
        self.sock.settimeout(left if prior is None else min(prior, left))
        try:
            return self.sock.recv(size)
        finally:
            self.sock.settimeout(prior)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


class HeaderFirstWorker(ThreadWorker):
    """gthread, except that a connection gets a thread only with a whole header block in hand."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # connections reading their header block, oldest deadline first (every deadline is
        # now + HEADER_TIMEOUT_S when appended, so appending keeps the order)
        self.heading: deque = deque()

    # All of gthread's paths to the thread pool (a new connection, a kept-alive one turning
    # readable, bytes read ahead behind a body) go through enqueue_req.
    def enqueue_req(self, conn) -> None:
        if self.cfg.is_ssl or getattr(conn, "zs_head_ready", False):
            conn.zs_head_ready = False
            super().enqueue_req(conn)
            return
        buf = bytearray(conn.parser.unreader.take_buffered() if conn.parser is not None else b"")
        conn.zs_head = buf
        conn.zs_head_deadline = time.monotonic() + HEADER_TIMEOUT_S
        if _head_complete(buf):
            self._hand_over(conn)
            return
        conn.sock.setblocking(False)
        self.heading.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_readable, conn))

    def _on_head_readable(self, conn, sock) -> None:
        try:
            data = sock.recv(16384)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._forget(conn)
            self._close(conn)
            return
        conn.zs_head += data
        if len(conn.zs_head) > MAX_HEAD_BYTES:
            self._forget(conn)
            try:
                sock.send(_TOO_LARGE)
            except OSError:
                pass
            self._close(conn)
        elif _head_complete(conn.zs_head):
            self._forget(conn)
            self._hand_over(conn)

    def _forget(self, conn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            self.heading.remove(conn)
        except ValueError:
            pass

    def _close(self, conn) -> None:
        self.nr_conns -= 1
        conn.close()

    def _hand_over(self, conn) -> None:
        """The header block is in: give the connection, its bytes and a body deadline to a thread."""
        head = bytes(conn.zs_head)
        conn.zs_head = None
        conn.sock.setblocking(True)
        conn.init()  # the HTTP/1 parser (no TLS here; prior-knowledge h2c is off in zswarm)
        conn.data_ready = True
        unreader = conn.parser.unreader
        if not isinstance(getattr(unreader, "sock", None), DeadlineReads) and hasattr(unreader, "sock"):
            unreader.sock = DeadlineReads(unreader.sock)
        if isinstance(getattr(unreader, "sock", None), DeadlineReads):
            unreader.sock.deadline = time.monotonic() + BODY_TIMEOUT_S
        unreader.unread(head)
        conn.zs_head_ready = True
        self.enqueue_req(conn)

    def accept(self, listener) -> None:
        """gthread's, except out of descriptors: gthread re-raises EMFILE and the worker exits
        (the arbiter boots another, which meets the same flood). Here the oldest connection still
        sending its header block goes instead (the likeliest to be a flood's), and the
        connection waiting in the backlog is taken at the next turn of the loop."""
        try:
            super().accept(listener)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            if self.heading:
                conn = self.heading.popleft()
                self._forget(conn)
                self._close(conn)
            else:  # every descriptor is a request being served: wait for one to end
                time.sleep(0.01)

    def murder_pending(self) -> None:
        """gthread's own sweep (connections deferred without data), then slow header blocks."""
        super().murder_pending()
        now = time.monotonic()
        while self.heading and self.heading[0].zs_head_deadline <= now:
            conn = self.heading.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            self.log.debug("closed %s: no whole request header within %s s", conn.client, HEADER_TIMEOUT_S)
            self._close(conn)

    def run(self) -> None:
        super().run()
        for conn in list(self.heading):  # stopping: nobody will read these any more
            self._forget(conn)
            self._close(conn)
