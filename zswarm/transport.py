"""Everything that configures or drives a ZeroMQ socket.

- :class:`ZapHandler` answers ZeroMQ's authentication requests: only a CURVE client holding the
  cluster's key gets in. It must be running before any CURVE socket binds, because without a ZAP
  handler libzmq accepts any client that completes the handshake.
- :class:`SocketLoop` is the one thread that owns a group of sockets. Other threads never touch
  them: they ``submit()`` a callable, which runs in the loop thread ("contexts are threadsafe,
  sockets are not"). Inbound frames are handed to a callback in the loop thread.

Every socket gets LINGER=0 and bounded queues; nothing here blocks without a timeout.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Callable

import zmq
import zmq.utils.z85

from .token import Keys

if TYPE_CHECKING:
    from .gate import Gate

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
SNDHWM = 1000  # messages; a slow peer loses gossip (it is resent anyway) instead of growing memory
MAXMSGSIZE = 1 << 20  # bytes; no gossip or admin message comes near this, so anything larger is hostile


class Stats:
    """Counters shared between threads (ints under a lock; read by the admin socket and /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def configure(sock: zmq.Socket) -> zmq.Socket:
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, MAXMSGSIZE)
    if sock.type in (zmq.PUB, zmq.DEALER, zmq.ROUTER):
        sock.sndhwm = SNDHWM
    return sock


def curve_server(sock: zmq.Socket, keys: Keys, own: tuple[bytes, bytes] | None = None) -> zmq.Socket:
    """Make ``sock`` a CURVE server; call before bind (ZeroMQ reads it at bind time).

    Without ``own``: the token's key pair, which every member (and a newcomer) knows. With
    ``own`` (public, secret: the node's, identity.py): a key only members know (it is in the
    node's signed record, which travels encrypted between members), so nobody can pose as this
    node, and only a member can complete a handshake. Either way the ZAP handler admits the
    client's key and hands it up as ``User-Id``, so the socket knows which key (which member)
    each connection is. The ZAP handler does not check client keys against the ledger: libzmq
    never redials a connection whose handshake was refused (a ZAP refusal is a protocol error,
    ``session_base.cpp``), so a peer that dialled before this node had its record would have
    stayed cut off for good."""
    public, secret = own if own is not None else (keys.curve_public, keys.curve_secret)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = b"zswarm"
    return sock


def curve_client(sock: zmq.Socket, keys: Keys, own: tuple[bytes, bytes] | None = None,
                 server: bytes | None = None) -> zmq.Socket:
    """A CURVE client of the cluster. The server key is ``server`` (a peer's own, from its signed
    record) or the token's (knowing it is what proves membership); the client key pair is
    ``own`` (public, secret: the node's own, identity.py), so peers' ZAP handlers can tell which
    node a connection is, or the token's. The server key may be set again per connect."""
    public, secret = own if own is not None else (keys.curve_public, keys.curve_secret)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server or keys.curve_public
    return sock


# --- links between nodes (gossip PUB/SUB, gateway ROUTERs) ---
# Without these, a link that a partition broke was left to TCP, whose retransmissions back off
# exponentially: gossip flowed again 7-8 s after a 20 s partition healed. With them, libzmq
# closes a silent link itself (ZMTP 3.1 PING/PONG, answered by libzmq's I/O thread, so a busy
# node still answers) and sends a SYN towards it about once a second, so a healed link is up
# again within about a second of the heal, whatever the partition's length.
# No TCP keepalive: the heartbeats are traffic, so TCP never sees the link idle.
HEARTBEAT_IVL_MS = 500  # a PING every half second (~60 B with CURVE): as often as the ledger's own beats
# Silence after a PING that closes the link. A link losing 10% of its packets at 400 ms RTT stalls
# 2-3 s when a segment and its retransmission are both lost (1 in 100 segments): that must not
# drop the link (tests/test_partition.py runs that link). A dead link is closed within
# IVL + TIMEOUT (4.5 s), so after any partition longer than that the link is being redialed when
# the network heals, and TCP's retransmission backoff no longer matters. The ledger's verdicts
# (suspect 2 s, dead 4 s) never wait for it.
HEARTBEAT_TIMEOUT_MS = 4000
HEARTBEAT_TTL_MS = 4000  # asked of the peer too, in every PING, for a peer that sets no timeout itself
RECONNECT_IVL_MS = 100  # first redial after a drop (libzmq's default)
RECONNECT_IVL_MAX_MS = 500  # redials back off to two a second, no further (plus libzmq's jitter, up to RECONNECT_IVL)
# A connect whose SYN is unanswered is given up after this and dialed anew: alone, the kernel
# would retransmit the SYN 1, 3, 7, 15, 31 s after the first, so a connect begun during a
# partition could wait half a minute after the heal. 1.5 s lets the kernel's own retransmission at
# 1 s go out, then the redial 0.5 s later sends the next: one SYN a second, evenly. It also leaves
# room for slow links: a LAN connect takes under 1 ms, one over a 400 ms-RTT link 0.4 s.
CONNECT_TIMEOUT_MS = 1500


def link_options(sock: zmq.Socket) -> zmq.Socket:
    """Heartbeats and reconnect timing for a tcp socket between nodes, connecting or binding.

    Call before ``bind``/``connect`` (libzmq copies the options at that moment). A link that a
    heartbeat closes shows as ``EVENT_DISCONNECTED`` on the socket's monitor and is redialed."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
    return sock


def tcp(hostport: str) -> str:
    return hostport if hostport.startswith("tcp://") else "tcp://" + hostport


def bind_private_ipc(sock: zmq.Socket, endpoint: str) -> zmq.Socket:
    """Bind ``sock`` to ``ipc://path`` in the node's state directory, for this user only (0600).

    A socket file already there is a killed node's: the state directory's lock says no other
    node runs there, so it is removed first (bind would fail on it otherwise)."""
    path = endpoint[len("ipc://"):]
    if os.path.exists(path):
        os.unlink(path)
    sock.bind(endpoint)
    os.chmod(path, 0o600)
    return sock


class SocketLoop(threading.Thread):
    """A thread that owns sockets, runs submitted calls, and ticks.

    ``setup(loop)`` runs in the loop thread before anything else and creates the sockets with
    :meth:`add`; an exception there is re-raised by :meth:`start_and_wait` in the caller.
    """

    def __init__(self, name: str, ctx: zmq.Context, setup: Callable[["SocketLoop"], None],
                 tick_s: float | None = None, on_tick: Callable[[], None] | None = None):
        super().__init__(name=name, daemon=True)
        self.ctx = ctx
        self._setup = setup
        self._tick_s = tick_s
        self._on_tick = on_tick
        self._tickers: list[Callable[[], None]] = []
        self._guards: dict[zmq.Socket, tuple[zmq.Socket, Callable[[], None]]] = {}  # guarded -> monitor, tick
        self._handlers: dict[zmq.Socket, Callable[[list[bytes]], None]] = {}
        self._frames: set[zmq.Socket] = set()  # handlers that get zmq.Frame objects
        self._poller = zmq.Poller()
        self._sockets: list[zmq.Socket] = []
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping = False
        self._close_linger_ms = 0

    # --- any thread ---
    def start_and_wait(self, timeout_s: float = 5.0) -> None:
        self.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"{self.name} did not start within {timeout_s} s")
        if self._error is not None:
            self.join(timeout_s)
            raise self._error

    def submit(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already; the loop will drain the deque

    def stop(self, timeout_s: float = 5.0, linger_ms: int = 0) -> bool:
        """Close the sockets (optionally letting queued sends flush) and end the thread."""
        def _stop() -> None:
            self._stopping = True
            self._close_linger_ms = linger_ms
        if self.is_alive():
            self.submit(_stop)
            self.join(timeout_s)
        alive = self.is_alive()
        if not alive:
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        return not alive

    # --- loop thread only ---
    def add(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None] | None = None,
            frames: bool = False) -> zmq.Socket:
        """Own ``sock``; ``handler`` gets what it receives: bytes, or with ``frames`` zmq.Frame
        objects (their metadata: ``frame.get("User-Id")`` is what the ZAP handler said of the peer)."""
        configure(sock)
        self._sockets.append(sock)
        if handler is not None:
            self._handlers[sock] = handler
            self._poller.register(sock, zmq.POLLIN)
            if frames:
                self._frames.add(sock)
        return sock

    def remove(self, sock: zmq.Socket) -> None:
        """Stop polling ``sock`` and close it (loop thread only)."""
        if sock in self._handlers:
            del self._handlers[sock]
            self._poller.unregister(sock)
        if sock in self._sockets:
            self._sockets.remove(sock)
        sock.close(linger=0)

    def socket(self, kind: int, handler: Callable[[list[bytes]], None] | None = None) -> zmq.Socket:
        return self.add(self.ctx.socket(kind), handler)

    def add_ticker(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` at every tick too (the loop must have been made with ``tick_s``)."""
        self._tickers.append(fn)

    def guard_socket(self, sock: zmq.Socket, gate: "Gate") -> zmq.Socket:
        """Put a bound tcp socket behind ``gate`` (see :mod:`zswarm.gate`); call before ``bind``."""
        monitor = gate.install(sock)
        self.add(monitor, lambda frames: gate.on_monitor(frames, monitor))
        self.add_ticker(gate.tick)
        self._guards[sock] = (monitor, gate.tick)
        return sock

    def remove_guarded(self, sock: zmq.Socket) -> None:
        """Close a socket that :meth:`guard_socket` guards, its monitor and gate with it."""
        monitor, tick = self._guards.pop(sock)
        try:
            sock.disable_monitor()  # before the monitor's reader closes (see _close_all)
        except zmq.ZMQError:
            pass
        self.remove(monitor)
        self._tickers.remove(tick)
        self.remove(sock)

    def run(self) -> None:
        try:
            self._setup(self)
        except BaseException as e:  # handed to start_and_wait's caller
            self._error = e
            self._close_all()
            self._ready.set()
            return
        self._ready.set()
        poller = self._poller
        poller.register(self._wake_r, zmq.POLLIN)
        next_tick = time.monotonic() + (self._tick_s or 0)
        try:
            while not self._stopping:
                timeout_ms = None
                if self._tick_s:
                    timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000))
                for sock_or_fd, _ in poller.poll(timeout_ms):
                    if sock_or_fd == self._wake_r:
                        os.read(self._wake_r, 4096)
                        continue
                    handler = self._handlers.get(sock_or_fd)
                    for _ in range(100 if handler else 0):  # bounded batch so ticks and calls are never starved
                        try:
                            frames = sock_or_fd.recv_multipart(zmq.NOBLOCK, copy=sock_or_fd not in self._frames)
                        except zmq.Again:
                            break
                        self._guard(handler, frames)
                while self._calls and not self._stopping:
                    self._guard(self._calls.popleft())
                if self._stopping:
                    while self._calls:  # last sends (a Leave) still go out
                        self._guard(self._calls.popleft())
                if self._tick_s and time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self._tick_s
                    if self._on_tick is not None:
                        self._guard(self._on_tick)
                    for fn in self._tickers:
                        self._guard(fn)
        finally:
            self._close_all()

    def _guard(self, fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s: handler failed; the loop goes on", self.name)

    def _close_all(self) -> None:
        # Monitors first: a socket closed while its monitor still gets events, and then that
        # monitor's reader, left libzmq's reaper stuck sending the socket's last events, and
        # every other socket of the context with it (a dead ledger's gate monitor made the
        # admin socket deaf: tests/test_actor_failure.py). disable_monitor stops them at once.
        for sock in self._sockets:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        for sock in self._sockets:
            sock.close(linger=self._close_linger_ms)
        self._sockets.clear()


class ZapHandler:
    """Answers ZAP requests for the context: CURVE clients only.

    Every CURVE server socket of a node uses the token's key, and a client can only complete a
    handshake with a server whose public key it knows: knowing it is holding the token. So any
    CURVE client key is admitted (each node connects with its own, identity.py), and its Z85
    form is handed up as the connection's ``User-Id``, which tells the ledger which node is
    talking. Keys of nodes the operator revoked (rotation.py) are refused (``auth_revoked``).
    A refused handshake (NULL, PLAIN, a malformed request) is counted (``auth_denied``)
    and logged at debug level only, so a stranger knocking cannot flood the log.
    """

    def __init__(self, ctx: zmq.Context, keys: Keys, stats: Stats):
        self._stats = stats
        self._denied: frozenset[bytes] = frozenset()  # revoked nodes' keys (Z85): refused for good
        self.loop = SocketLoop("zap", ctx, self._setup)

    def deny(self, keys: frozenset[bytes]) -> None:
        """Refuse these client keys (Z85) from now on (any thread: one reference swapped). A ZAP
        refusal is final for the connecting side: libzmq does not dial that address again."""
        self._denied = frozenset(keys)

    def _setup(self, loop: SocketLoop) -> None:
        self._sock = loop.socket(zmq.REP, self._handle)
        self._sock.bind(ZAP_ENDPOINT)

    def start(self) -> None:
        self.loop.start_and_wait()

    def stop(self, timeout_s: float = 5.0) -> bool:
        return self.loop.stop(timeout_s)

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 6:
            self._sock.send_multipart([b"1.0", b"", b"400", b"bad ZAP request", b"", b""])
            return
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        user = zmq.utils.z85.encode(frames[6]) if mechanism == b"CURVE" and len(frames) >= 7 \
            and len(frames[6]) == 32 else b""
        if user and user in self._denied:
            self._stats.inc("auth_revoked")
            self._sock.send_multipart([version, request_id, b"400", b"revoked", b"", b""])
        elif user:
            self._stats.inc("auth_ok")
            self._sock.send_multipart([version, request_id, b"200", b"OK", user, b""])
        else:
            self._stats.inc("auth_denied")
            log.debug("refused %s handshake from %s", mechanism.decode(errors="replace"), address.decode(errors="replace"))
            self._sock.send_multipart([version, request_id, b"400", b"not a member", b"", b""])
