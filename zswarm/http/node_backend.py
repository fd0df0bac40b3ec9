"""The Backend that reaches the node over its ipc socket: one ZeroMQ DEALER per worker thread.

gunicorn's gthread worker runs each request, streamed body included, in one pool thread, and
ZeroMQ sockets must never be shared between threads, so each thread lazily opens its own DEALER
(``threading.local``). A reply left over from an earlier request on that socket (a Chunk after
a Cancel, a late answer after a timeout) is recognised by its request id and dropped.

The ZeroMQ context is created on first use in each process and never carried across a fork: a
gunicorn worker forked from a master that had touched this object starts afresh.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Iterator

import zmq

from .. import transport, wire
from .backend import BackendUnavailable, Reply

log = logging.getLogger(__name__)

DEADLINE_GRACE_S = 2.0  # past a request's timeout, how long to wait for the node's own 504


class _ThreadSocket:
    """One thread's socket; closed when that thread ends and its thread-local values are dropped
    (the owner is gone by then, so closing from whichever thread runs this is safe)."""

    def __init__(self, sock: zmq.Socket, pid: int):
        self.sock = sock
        self.pid = pid

    def __del__(self) -> None:
        if self.pid == os.getpid() and not self.sock.closed:
            self.sock.close(linger=0)


class NodeBackend:
    """Speaks to the node at ``endpoint`` (``ipc://...``).

    ``timeout_s`` bounds the wait between two messages of an answer. Its default covers prompt
    processing of a long prompt on a slow CPU before the first token; a node that says nothing
    for that long is treated as gone. ``quick_timeout_s`` bounds what a live node does at once:
    taking a request (ZeroMQ has connected to it) and answering a models query; a node that is
    down fails requests after this long, not after ``timeout_s``.
    ``models_ttl_s`` is how long a model list is reused: every completion checks its model, and
    one round trip per request to learn what changes once a minute would be waste.
    """

    def __init__(self, endpoint: str, timeout_s: float = 300.0, quick_timeout_s: float = 5.0,
                 models_ttl_s: float = 2.0):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.quick_timeout_s = min(quick_timeout_s, timeout_s)
        self.models_ttl_s = models_ttl_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pid = 0
        self._ctx: zmq.Context | None = None
        self._models: tuple[float, list[str]] | None = None  # (monotonic time fetched, names)
        self._problem = ""  # from the last ModelsReply
        self._recent: list[str] = []  # from the last ModelsReply

    # --- the Backend protocol; any thread ---
    def models(self) -> list[str]:
        with self._lock:
            cached = self._models
        if cached is not None and time.monotonic() - cached[0] < self.models_ttl_s:
            return list(cached[1])
        query = wire.ModelsQuery(uuid.uuid4().hex)
        sock = self._socket()
        if not self._send(sock, query):
            raise BackendUnavailable(f"the node at {self.endpoint} did not take a query within {self.quick_timeout_s} s")
        for body in self._replies(sock, query.id, self.quick_timeout_s):
            if isinstance(body, wire.ModelsReply):
                with self._lock:
                    self._models = (time.monotonic(), list(body.models))
                    self._problem = body.problem
                    self._recent = list(body.recent)
                return list(body.models)
        raise BackendUnavailable(f"the node at {self.endpoint} did not answer within {self.quick_timeout_s} s")

    def problem(self) -> str:
        with self._lock:
            return self._problem

    def recent(self) -> list[str]:
        with self._lock:
            return list(self._recent)

    def generate(self, req: wire.GenRequest) -> Iterator[Reply]:
        sock = self._socket()
        if not self._send(sock, req):
            yield wire.Fail(id=req.id, code="timeout",
                            message=f"The node did not take the request within {self.quick_timeout_s} s.")
            return
        # the node ends the request at its deadline (a Fail "timeout"); waiting a little longer
        # than that covers a node too stuck to say so
        until = time.monotonic() + req.timeout_s + DEADLINE_GRACE_S if req.timeout_s else None
        # a whole answer comes in one piece at its end (the gateway holds its chunks), so silence
        # until then says nothing; its deadline bounds the wait instead
        silence_s = req.timeout_s + DEADLINE_GRACE_S if req.whole and req.timeout_s else self.timeout_s
        started = False
        for body in self._replies(sock, req.id, silence_s, until):
            if isinstance(body, wire.Chunk):
                started = True
                yield body
            elif isinstance(body, (wire.Done, wire.Fail)):
                yield body
                return
        self.cancel(req.id)  # the node may still be working on it; tell it to stop
        late = until is not None and time.monotonic() >= until
        yield wire.Fail(id=req.id, code="timeout", started=started,
                        message=f"No answer within the request's timeout of {req.timeout_s:g} s." if late
                        else f"The node sent nothing for {self.timeout_s} s.")

    def cancel(self, request_id: str) -> None:
        try:
            self._socket().send(wire.encode_inference(self._sender(), wire.Cancel(request_id)), zmq.NOBLOCK)
        except zmq.ZMQError as e:  # not connected or queue full: the node's own deadline ends it
            log.debug("cancel %s not sent: %s", request_id, e)

    def close(self) -> None:
        """Close every socket of this process (at worker exit; no request may be running)."""
        with self._lock:
            if self._ctx is not None and self._pid == os.getpid():
                self._ctx.destroy(linger=0)
            self._ctx = None
            self._pid = 0

    # --- internals; the calling thread's socket only ---
    def _sender(self) -> str:
        return f"http-{os.getpid()}"

    def _socket(self) -> zmq.Socket:
        pid = os.getpid()
        owned = getattr(self._local, "owned", None)
        if owned is not None and owned.pid == pid and not owned.sock.closed:
            return owned.sock
        with self._lock:
            if self._ctx is None or self._pid != pid:  # first use here, or a fork since: never reuse
                self._ctx = zmq.Context()
                self._pid = pid
            sock = transport.configure(self._ctx.socket(zmq.DEALER))
        # IMMEDIATE: queue nothing for a node that is not connected, so a request made while the
        # node is down fails by timeout instead of being delivered, stale, when it comes back.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(self.endpoint)
        self._local.owned = _ThreadSocket(sock, pid)
        return sock

    def _send(self, sock: zmq.Socket, body: wire.Inference) -> bool:
        if not sock.poll(int(self.quick_timeout_s * 1000), zmq.POLLOUT):
            return False
        try:
            sock.send(wire.encode_inference(self._sender(), body), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _replies(self, sock: zmq.Socket, request_id: str, timeout_s: float,
                 until: float | None = None) -> Iterator[object]:
        """Bodies addressed to ``request_id``, until ``timeout_s`` passes without one, or ``until``
        (monotonic) passes."""
        deadline = time.monotonic() + timeout_s
        while (left := min(deadline, until or deadline) - time.monotonic()) > 0:
            if not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                return
            try:
                body = wire.decode_inference(sock.recv(zmq.NOBLOCK)).body
            except zmq.Again:
                continue
            except wire.BadFrame as e:
                log.warning("dropped a frame from the node: %s", e)
                continue
            if getattr(body, "id", None) != request_id:
                continue  # left over from an earlier request on this thread's socket
            yield body
            deadline = time.monotonic() + timeout_s
