"""Byte-stream tunnels: llama.cpp RPC (plain TCP, no authentication) carried inside CURVE ZeroMQ.

- :class:`TunnelExit` runs on a worker: a CURVE ROUTER that, for every stream a cluster member
  opens, connects to the worker's RPC server on 127.0.0.1 and pumps bytes both ways. A p2p
  worker's RPC server listens in a network namespace of its own, out of every other local user's
  reach; the exit then gets each connection from the RPC child's broker, ready made
  (:mod:`zswarm.engine.isolation`), and uses it exactly as one it made itself.
- :class:`TunnelEntry` runs on the server: it listens on 127.0.0.1 (one port per remote worker),
  and carries every TCP connection it accepts over one CURVE DEALER to that worker's exit, each
  connection as its own stream. It serves only the node's own user: a connection from a socket
  another uid owns is reset at once (:mod:`zswarm.sockowner`).

Each end is one thread that owns its ZeroMQ sockets *and* its TCP sockets (non-blocking, all in
one ``zmq.Poller``); no other thread ever touches them. This module must never connect anywhere
but the exit's configured loopback target, never buffer without bound, and never let a bad
frame end the thread: malformed frames are dropped and counted (``tunnel_bad_frames``).

Wire protocol (every message is three frames; a ROUTER sees the peer's routing id in front)::

    stream id (4 bytes, big-endian; 0 = the connection itself) | kind (1 byte) | payload

Flow control is per stream and credit based, so one slow reader stalls only its own stream and
no end buffers more than a window per stream: a sender may only have ``credit`` bytes in flight,
each DATA message costing its payload plus :data:`FRAME_COST`; the receiver hands credit back
(ACK) as it writes bytes into its TCP socket. A sender out of credit stops reading its TCP socket,
so the back-pressure reaches the application that writes. The opener grants the exit its window
in OPEN; the exit grants the entry its window in its first ACK, sent once the target connection
is up, so no byte is read before it has somewhere to go.

Close: a TCP end that reaches EOF sends SHUT and the other end shuts down writing once everything
before it is written (half close, as TCP has it); a stream ends when both directions have. A
reset, an error or a protocol violation sends CLOSE, which resets the other end's connection
(RST, so that a cut stream never looks like a complete one).

Liveness: the entry's DEALER uses ``IMMEDIATE``, so nothing queues while no exit is connected. A
disconnect (seen on the DEALER's monitor) resets every stream of the entry at once and moves its
*epoch* on; the entry PINGs every ``heartbeat_s`` with its epoch, and the exit resets the streams
of an older epoch, or of an entry it has not heard from for ``peer_timeout_s``. The entry's
routing id is fixed (ROUTER_HANDOVER), so a reconnecting entry is recognised.

A holder of the token is a cluster member and is trusted with the RPC server (that is the
point); the tunnel keeps strangers out (CURVE + ZAP), and keeps members' mistakes from crashing it.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from typing import Hashable

import zmq
from zmq.utils.monitor import parse_monitor_message

from .engine.isolation import REPLY as _BROKER_REPLY, REQUEST as _BROKER_REQUEST
from .gate import Gate
from .sockowner import Unknown, peer_uid
from .token import Keys, validate_endpoint
from .transport import Stats, configure, curve_client, curve_server, tcp

log = logging.getLogger(__name__)

# --- wire protocol. ONLY APPEND kinds: their values are part of the protocol itself. ---
PROTOCOL_VERSION = 1
OPEN = b"\x01"   # entry -> exit: u8 version | u32 window the entry grants | u32 entry epoch
DATA = b"\x02"   # either way: 1..MAX_DATA_BYTES of the stream
SHUT = b"\x03"   # either way: the sender's TCP side reached EOF (half close)
CLOSE = b"\x04"  # either way: the stream is cut; drop what is buffered and reset the connection
ACK = b"\x05"    # either way: u32 credit handed back; the exit's first ACK means "connected"
PING = b"\x06"   # entry -> exit on stream 0: u8 version | u32 entry epoch
PONG = b"\x07"   # exit -> entry on stream 0: empty
_OPEN = struct.Struct(">BII")
_PING = struct.Struct(">BI")
_U32 = struct.Struct(">I")
_CONTROL = bytes(4)

MAX_DATA_BYTES = 256 * 1024  # one DATA payload; large, because llama.cpp pushes ~100 MB of weights at load
FRAME_COST = 256  # credit a DATA message costs on top of its payload: memory stays bounded for 1-byte messages too
DEFAULT_WINDOW_BYTES = 4 * 1024 * 1024  # per stream and direction: 16 chunks; above a 10 Gb/s LAN's bandwidth x delay
MIN_WINDOW_BYTES = 16 * 1024  # below this a window could not carry one message plus its cost
MAX_WINDOW_BYTES = 256 * 1024 * 1024  # a larger grant is a bug or hostile
DEFAULT_MAX_STREAMS = 64  # llama.cpp opens a handful of connections per RPC server
HEARTBEAT_S = 1.0  # how often an entry PINGs its exit
# Silence after which the other end is presumed gone. Any frame counts as life (a PING can queue
# behind a window of DATA on a slow link), so a busy link never times out.
PEER_TIMEOUT_S = 10.0
# How long an exit waits for the broker's answer before it fails the stream (an RPC child that is
# restarting, say): a connect on loopback takes microseconds, so only a broker that is gone waits this.
BROKER_TIMEOUT_S = 3.0
_ZMQ_BATCH = 256  # messages drained per wake-up, so TCP sockets are never starved


def _loopback(target: tuple[str, int]) -> tuple[str, int]:
    host, port = target
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok or not 0 < int(port) < 65536:
        raise ValueError(f"tunnel target must be a loopback address and port (llama.cpp RPC has no "
                         f"authentication), not {host}:{port}")
    return host, int(port)


class _Stream:
    """One TCP connection and its half of the stream's state (owned by the loop thread)."""

    __slots__ = ("key", "sid", "peer", "sock", "fd", "connecting", "established", "tx_credit",
                 "rx", "rx_bytes", "rx_allow", "rx_used", "read_eof", "peer_eof", "wr_shut", "flags")

    def __init__(self, key: Hashable, sid: bytes, peer: bytes | None, sock: socket.socket | None):
        self.key, self.sid, self.peer, self.sock = key, sid, peer, sock
        self.fd = sock.fileno() if sock is not None else -1  # None: an exit stream awaiting its broker's socket
        self.connecting = False  # exit only: non-blocking connect to the target in progress
        self.established = False  # may read the TCP socket (entry: the exit has acknowledged)
        self.tx_credit = 0  # bytes (with FRAME_COST) we may still send to the other end
        self.rx: collections.deque[memoryview] = collections.deque()  # received, not yet written to TCP
        self.rx_bytes = 0
        self.rx_allow = 0  # credit we have granted and the other end has not used yet
        self.rx_used = 0  # credit freed by writing to TCP, not handed back yet
        self.read_eof = False  # our TCP side reached EOF (SHUT sent)
        self.peer_eof = False  # the other end sent SHUT
        self.wr_shut = False  # we shut down writing on our TCP side
        self.flags = 0  # what the poller watches on fd


class _Peer:
    """What an exit knows of one entry (by routing id)."""

    __slots__ = ("last_heard", "epoch", "streams")

    def __init__(self, now: float):
        self.last_heard = now  # monotonic s of its last frame
        self.epoch: int | None = None  # its connection epoch; streams of an older one are dead
        self.streams: set[Hashable] = set()


class _TunnelEnd:
    """The loop shared by both ends: one thread, one ZeroMQ socket, many TCP sockets."""

    def __init__(self, name: str, ctx: zmq.Context, keys: Keys, stats: Stats, *,
                 window_bytes: int, chunk_bytes: int, max_streams: int,
                 heartbeat_s: float, peer_timeout_s: float):
        if not MIN_WINDOW_BYTES <= window_bytes <= MAX_WINDOW_BYTES:
            raise ValueError(f"window_bytes must be within {MIN_WINDOW_BYTES}..{MAX_WINDOW_BYTES}")
        if not 1 <= chunk_bytes <= MAX_DATA_BYTES:
            raise ValueError(f"chunk_bytes must be within 1..{MAX_DATA_BYTES}")
        self.ctx, self.keys, self.stats = ctx, keys, stats
        self.window_bytes = window_bytes
        self.chunk_bytes = chunk_bytes
        self.max_streams = max_streams
        self.heartbeat_s = heartbeat_s
        self.peer_timeout_s = peer_timeout_s
        self._rbuf = bytearray(chunk_bytes)
        self._rview = memoryview(self._rbuf)
        # Credit goes back in quarters: few ACKs, and a sender always keeps >= 3/4 of a window (no stall).
        self._ack_at = window_bytes // 4
        self._streams: dict[Hashable, _Stream] = {}
        self._by_fd: dict[int, _Stream] = {}
        self._dirty: set[_Stream] = set()
        self._poller = zmq.Poller()
        self._zsock: zmq.Socket | None = None
        self._wake_r = self._wake_w = -1  # a pipe that wakes the loop; made by start()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping = False
        self.buffered_bytes = 0  # received from the other end, not yet written to TCP (all streams)
        self.max_buffered_bytes = 0  # high-water mark of buffered_bytes, for tests and /metrics

    # --- any thread ---
    def start(self, timeout_s: float = 5.0) -> None:
        """Start the thread; raise what its setup raised (a bind that failed, say)."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"{self._thread.name} did not start within {timeout_s} s")
        if self._error is not None:
            self.stop(timeout_s)
            raise self._error

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Reset every stream, close every socket, end the thread; False if it did not end in time."""
        self._stopping = True
        if self._thread.is_alive():
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass
            self._thread.join(timeout_s)
        alive = self._thread.is_alive()
        if not alive:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
        return not alive

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- loop thread only ---
    def _setup(self) -> None:
        raise NotImplementedError

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        raise NotImplementedError

    def _on_timer(self, now: float) -> None:
        raise NotImplementedError

    def _on_other(self, obj, ev: int) -> None:
        """A socket or fd the subclass registered itself (a listener, a monitor)."""

    def _send(self, s: _Stream, kind: bytes, payload: bytes = b"") -> bool:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            self._setup()
        except BaseException as e:  # handed to start()'s caller
            self._error = e
            self._teardown()
            self._ready.set()
            return
        self._ready.set()
        poller = self._poller
        poller.register(self._wake_r, zmq.POLLIN)
        next_timer = time.monotonic() + self.heartbeat_s
        try:
            while not self._stopping:
                timeout_ms = max(0, int((next_timer - time.monotonic()) * 1000) + 1)
                for obj, ev in poller.poll(timeout_ms):
                    if obj is self._zsock:
                        self._drain_zmq()
                    elif obj == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif isinstance(obj, int) and obj in self._by_fd:
                        self._guard_stream(self._by_fd[obj], ev)
                    else:
                        self._guard(self._on_other, obj, ev)
                now = time.monotonic()
                if now >= next_timer:
                    next_timer = now + self.heartbeat_s
                    self._guard(self._on_timer, now)
                self._update_polling()
        except Exception:
            log.exception("%s: loop failed; closing every stream", self._thread.name)
        finally:
            self._teardown()

    def _drain_zmq(self) -> None:
        for _ in range(_ZMQ_BATCH):
            try:
                frames = self._zsock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._on_frames(frames)
            except Exception:  # a bug, not a peer: log it, keep serving the other streams
                log.exception("%s: frame handler failed", self._thread.name)
                self.stats.inc("tunnel_bad_frames")

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s: handler failed; the loop goes on", self._thread.name)

    def _bad(self, what: str) -> None:
        self.stats.inc("tunnel_bad_frames")
        log.debug("%s: dropped a bad frame (%s)", self._thread.name, what)

    # --- streams ---
    def _add_stream(self, s: _Stream) -> None:
        self._streams[s.key] = s
        if s.sock is not None:  # a stream awaiting the broker's socket has no fd yet
            self._by_fd[s.fd] = s
        self._dirty.add(s)
        self.stats.inc("tunnel_streams")

    def _remove(self, s: _Stream, reset: bool) -> None:
        if self._streams.get(s.key) is not s:
            return
        del self._streams[s.key]
        self._dirty.discard(s)
        if s.flags:
            self._poller.unregister(s.fd)
            s.flags = 0
        self.buffered_bytes -= s.rx_bytes
        s.rx.clear()
        s.rx_bytes = 0
        if s.sock is not None:  # None: it never got its socket from the broker
            del self._by_fd[s.fd]
            if reset:  # RST, not FIN: the application must not mistake a cut stream for a finished one
                try:
                    s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            s.sock.close()
        self._on_removed(s)

    def _on_removed(self, s: _Stream) -> None:
        pass

    def _abort(self, s: _Stream, notify: bool) -> None:
        if self._streams.get(s.key) is not s:
            return
        self.stats.inc("tunnel_streams_reset")
        if notify:
            self._send(s, CLOSE)
        self._remove(s, reset=True)

    def _guard_stream(self, s: _Stream, ev: int) -> None:
        try:
            self._on_fd(s, ev)
        except Exception:
            log.exception("%s: stream %s failed; resetting it", self._thread.name, s.sid.hex())
            self._abort(s, notify=True)

    def _on_fd(self, s: _Stream, ev: int) -> None:
        if s.connecting:
            self._on_connected(s)
            return
        if ev & zmq.POLLERR:
            err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                log.debug("%s: stream %s: %s", self._thread.name, s.sid.hex(), os.strerror(err))
                self._abort(s, notify=True)
                return
            ev |= s.flags  # a hang-up: let the read or the write find out what it means
        if ev & zmq.POLLOUT:
            self._flush(s)
        if ev & zmq.POLLIN and self._streams.get(s.key) is s:
            self._read(s)

    def _on_connected(self, s: _Stream) -> None:
        raise NotImplementedError

    def _read(self, s: _Stream) -> None:
        budget = s.tx_credit - FRAME_COST
        if s.read_eof or not s.established or budget <= 0:
            return
        try:
            # Into one reused buffer: recv() would allocate (and the allocator map and fault in)
            # 256 KiB per message, and cost three times as much per byte; ZeroMQ copies it anyway.
            n = s.sock.recv_into(self._rbuf, min(self.chunk_bytes, budget))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._abort(s, notify=True)
            return
        self._dirty.add(s)
        if not n:
            s.read_eof = True
            self._send(s, SHUT)
            self._maybe_done(s)
            return
        s.tx_credit -= n + FRAME_COST
        if self._send(s, DATA, self._rview[:n]):
            self.stats.inc("tunnel_bytes_out", n)

    def _flush(self, s: _Stream) -> None:
        """Write what the other end sent into our TCP socket; hand credit back as it drains."""
        if s.connecting:
            return
        rx = s.rx
        while rx:
            view = rx[0]
            try:
                n = s.sock.send(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._abort(s, notify=True)
                return
            s.rx_used += n
            s.rx_bytes -= n
            self.buffered_bytes -= n
            if n < len(view):
                rx[0] = view[n:]
                break
            rx.popleft()
            s.rx_used += FRAME_COST
        self._dirty.add(s)
        if s.rx_used >= self._ack_at and not s.peer_eof:  # after SHUT the other end sends nothing more
            if not self._send(s, ACK, _U32.pack(s.rx_used)):
                return
            s.rx_allow += s.rx_used
            s.rx_used = 0
        if not rx and s.peer_eof and not s.wr_shut:
            s.wr_shut = True
            try:
                s.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._maybe_done(s)

    def _maybe_done(self, s: _Stream) -> None:
        if s.read_eof and s.wr_shut and self._streams.get(s.key) is s:
            self._remove(s, reset=False)

    def _on_stream_frame(self, s: _Stream, kind: bytes, payload: zmq.Frame) -> None:
        """DATA, SHUT, CLOSE or ACK for a stream we hold."""
        if kind == DATA:
            view = payload.buffer
            n = len(view)
            cost = n + FRAME_COST
            if n == 0 or n > MAX_DATA_BYTES or s.peer_eof or cost > s.rx_allow:
                self._bad(f"DATA of {n} bytes beyond the credit granted, or after SHUT")
                self._abort(s, notify=True)
                return
            s.rx_allow -= cost
            s.rx.append(view)
            s.rx_bytes += n
            self.buffered_bytes += n
            if self.buffered_bytes > self.max_buffered_bytes:
                self.max_buffered_bytes = self.buffered_bytes
            self.stats.inc("tunnel_bytes_in", n)
            if len(s.rx) == 1:
                self._flush(s)  # optimistic: usually the TCP socket has room, and a poll round trip is saved
        elif kind == ACK:
            raw = payload.bytes
            if len(raw) != 4:
                self._bad("ACK payload")
                return
            if s.read_eof:
                return  # we send nothing more; a late ACK is normal
            s.tx_credit += _U32.unpack(raw)[0]
            if s.tx_credit > MAX_WINDOW_BYTES:
                self._bad("credit beyond the largest window")
                self._abort(s, notify=True)
                return
            s.established = True
            self._dirty.add(s)
        elif kind == SHUT:
            if s.peer_eof:
                self._bad("second SHUT")
                return
            s.peer_eof = True
            self._flush(s)
        elif kind == CLOSE:
            self._abort(s, notify=False)
        else:
            self._bad(f"kind {kind.hex()} on stream {s.sid.hex()}")

    def _update_polling(self) -> None:
        for s in self._dirty:
            if self._streams.get(s.key) is not s or s.sock is None:  # gone, or nothing to poll yet
                continue
            if s.connecting:
                want = zmq.POLLOUT
            else:
                want = zmq.POLLIN if (s.established and not s.read_eof and s.tx_credit > FRAME_COST) else 0
                if s.rx:
                    want |= zmq.POLLOUT
            if want != s.flags:
                if want:
                    self._poller.register(s.fd, want)
                else:
                    self._poller.unregister(s.fd)
                s.flags = want
        self._dirty.clear()

    def _abort_all(self, notify: bool) -> int:
        streams = list(self._streams.values())
        for s in streams:
            self._abort(s, notify)
        return len(streams)

    def _teardown(self) -> None:
        try:
            self._abort_all(notify=self._zsock is not None)
        except Exception:
            log.exception("%s: resetting streams at stop failed", self._thread.name)
        self._close_extra()
        if self._zsock is not None:
            self._zsock.close(linger=100)  # the CLOSEs above get a moment to leave
            self._zsock = None

    def _close_extra(self) -> None:
        pass


class TunnelExit(_TunnelEnd):
    """The worker's end: a CURVE ROUTER on ``listen`` that connects each stream to ``target``.

    A ZAP handler (:class:`zswarm.transport.ZapHandler`) must already run in ``ctx``: without one,
    libzmq lets any CURVE client in. ``target`` must be a loopback address. ``listen`` may use
    port 0; :attr:`endpoint` and :attr:`port` say what was bound (after :meth:`start`).

    ``broker``: the node's end of the RPC child's connection broker (an AF_UNIX SOCK_SEQPACKET
    socket, :mod:`zswarm.engine.isolation`). With it, each stream's connection is asked of the
    broker instead of made here (``target`` is then where it connects, inside the child's network
    namespace: for the logs), without blocking: the request goes out at OPEN, the socket comes
    back through the poller. The exit owns the socket from then on and closes it at stop.
    """

    def __init__(self, ctx: zmq.Context, keys: Keys, listen: str, target: tuple[str, int], stats: Stats, *,
                 window_bytes: int = DEFAULT_WINDOW_BYTES, chunk_bytes: int = MAX_DATA_BYTES,
                 max_streams: int = DEFAULT_MAX_STREAMS, heartbeat_s: float = HEARTBEAT_S,
                 peer_timeout_s: float = PEER_TIMEOUT_S, broker: socket.socket | None = None,
                 broker_timeout_s: float = BROKER_TIMEOUT_S, own: tuple[bytes, bytes] | None = None):
        super().__init__("tunnel-exit", ctx, keys, stats, window_bytes=window_bytes, chunk_bytes=chunk_bytes,
                         max_streams=max_streams, heartbeat_s=heartbeat_s, peer_timeout_s=peer_timeout_s)
        self._listen = tcp(validate_endpoint(listen.removeprefix("tcp://"), allow_port_zero=True))
        self.target = _loopback(target)
        self._family = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
        self._peers: dict[bytes, _Peer] = {}  # by routing id
        self._warned_versions: set[bytes] = set()
        self.endpoint = ""
        self._broker = broker
        self.broker_timeout_s = broker_timeout_s
        self._awaiting: dict[int, tuple[_Stream, float]] = {}  # broker request id -> (stream, monotonic s asked)
        self._next_request = 1
        self._gate: Gate | None = None
        self._gate_monitor: zmq.Socket | None = None
        # ``own``: this worker's CURVE key pair (only members know its public half), and a stream
        # opens only for a key :meth:`admit` names (the server whose split this worker serves)
        self._own = own
        self._admitted: frozenset[bytes] | None = frozenset() if own is not None else None

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def admit(self, keys: frozenset[bytes]) -> None:
        """The client keys (Z85) whose streams may open from now on (any thread: one reference
        swapped). Streams already open go on: a server losing its claim stops using them itself."""
        self._admitted = frozenset(keys)

    def _setup(self) -> None:
        sock = configure(self.ctx.socket(zmq.ROUTER))
        self._zsock = sock
        sock.sndhwm = sock.rcvhwm = 0  # per-stream credit bounds what is queued; an HWM would drop DATA silently
        sock.router_handover = 1  # a reconnecting entry keeps its routing id, so its epoch is recognised
        curve_server(sock, self.keys, self._own)
        self._gate = Gate("tunnel", self.stats)  # strangers' idle connections are bounded (gate.py)
        self._gate_monitor = self._gate.install(sock)
        sock.bind(self._listen)
        self.endpoint = sock.last_endpoint.decode()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._gate_monitor, zmq.POLLIN)
        if self._broker is not None:
            self._broker.setblocking(False)  # the loop never waits on the broker: replies come through the poller
            self._poller.register(self._broker.fileno(), zmq.POLLIN)

    def _close_extra(self) -> None:
        if self._zsock is not None and self._gate_monitor is not None:
            self._zsock.disable_monitor()  # before its reader closes, or the socket's close stalls
        if self._gate_monitor is not None:
            self._gate_monitor.close(linger=0)
            self._gate_monitor = None
        if self._broker is not None:
            self._broker.close()
            self._broker = None

    def _send(self, s: _Stream, kind: bytes, payload: bytes = b"") -> bool:
        if self._zsock is None:
            return False
        self._zsock.send_multipart([s.peer, s.sid, kind, payload])  # HWM 0: never blocks; an unknown peer is dropped
        return True

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 4:
            self._bad(f"{len(frames)} frames")
            return
        peer, sid, kind = frames[0].bytes, frames[1].bytes, frames[2].bytes
        if len(sid) != 4 or len(kind) != 1:
            self._bad("stream id or kind of the wrong size")
            return
        now = time.monotonic()
        p = self._peers.get(peer)
        if p is None:
            p = self._peers[peer] = _Peer(now)
        p.last_heard = now
        if sid == _CONTROL:
            if kind != PING:
                self._bad(f"kind {kind.hex()} on stream 0")
                return
            raw = frames[3].bytes
            if len(raw) != _PING.size or not self._version_ok(peer, raw[0]):
                self._bad("PING payload")
                return
            self._new_epoch(p, _PING.unpack(raw)[1])
            self._zsock.send_multipart([peer, _CONTROL, PONG, b""])
            return
        s = self._streams.get((peer, sid))
        if kind == OPEN:
            admitted = self._admitted
            if admitted is not None and frames[2].get("User-Id").encode() not in admitted:
                self.stats.inc("tunnel_exit_refused")  # a member, but not the server this worker serves
                self._zsock.send_multipart([peer, sid, CLOSE, b""])
                return
            self._open(peer, p, sid, frames[3].bytes, s)
        elif s is None:
            self.stats.inc("tunnel_unknown_stream")  # usually a frame that crossed a CLOSE; harmless
        else:
            self._on_stream_frame(s, kind, frames[3])

    def _version_ok(self, peer: bytes, version: int) -> bool:
        if version == PROTOCOL_VERSION:
            return True
        if peer not in self._warned_versions and len(self._warned_versions) < 64:
            self._warned_versions.add(peer)
            log.warning("a tunnel entry speaks protocol %d, this exit speaks %d: upgrade the older node",
                        version, PROTOCOL_VERSION)
        return False

    def _new_epoch(self, p: _Peer, epoch: int) -> None:
        if p.epoch != epoch:
            if p.epoch is not None:  # the entry reconnected: its old streams are gone on its side
                self._abort_peer(p, notify=False)
            p.epoch = epoch

    def _abort_peer(self, p: _Peer, notify: bool) -> None:
        for key in list(p.streams):
            s = self._streams.get(key)
            if s is not None:
                self._abort(s, notify)

    def _open(self, peer: bytes, p: _Peer, sid: bytes, raw: bytes, existing: _Stream | None) -> None:
        if existing is not None or len(raw) != _OPEN.size:
            self._bad("OPEN of an open stream, or its payload")
            return
        version, window, epoch = _OPEN.unpack(raw)
        if not self._version_ok(peer, version):
            self._zsock.send_multipart([peer, sid, CLOSE, b""])
            return
        if not MIN_WINDOW_BYTES <= window <= MAX_WINDOW_BYTES:
            self._bad(f"OPEN window {window}")
            self._zsock.send_multipart([peer, sid, CLOSE, b""])
            return
        self._new_epoch(p, epoch)
        if len(self._streams) >= self.max_streams:
            self.stats.inc("tunnel_streams_refused")
            log.warning("tunnel exit: %d streams open already; refusing another", len(self._streams))
            self._zsock.send_multipart([peer, sid, CLOSE, b""])
            return
        if self._broker is not None:  # the target is in the RPC child's namespace: only the broker reaches it
            self._ask_broker(peer, p, sid, window)
            return
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # RPC is request/reply: Nagle only adds latency
        err = sock.connect_ex(self.target)  # the configured loopback target, never an address from the wire
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._connect_failed(peer, sid, err)
            return
        s = _Stream((peer, sid), sid, peer, sock)
        s.tx_credit = window
        s.connecting = True
        p.streams.add(s.key)
        self._add_stream(s)
        if err == 0:
            self._on_connected(s)

    def _ask_broker(self, peer: bytes, p: _Peer, sid: bytes, window: int) -> None:
        """OPEN with a broker: ask it for a connection; the stream waits for it (``sock`` None)."""
        rid = self._next_request
        self._next_request += 1
        try:
            self._broker.send(_BROKER_REQUEST.pack(rid), socket.MSG_DONTWAIT)
        except OSError as e:  # the child is gone, or its channel is full: never wait for it
            self._connect_failed(peer, sid, e.errno or errno.EIO)
            return
        s = _Stream((peer, sid), sid, peer, None)
        s.tx_credit = window
        s.connecting = True  # from the reply on, exactly as a connect of our own: POLLOUT, then SO_ERROR
        p.streams.add(s.key)
        self._add_stream(s)
        self._awaiting[rid] = (s, time.monotonic())

    def _on_other(self, obj, ev: int) -> None:
        if obj is self._gate_monitor:
            self._gate.on_monitor(self._gate_monitor.recv_multipart(), self._gate_monitor)
            return
        if self._broker is not None and obj == self._broker.fileno():
            self._on_broker()

    def _on_broker(self) -> None:
        """The broker's answers: a connection (in progress) for each stream that waits for one."""
        for _ in range(64):
            try:
                msg, fds, _flags, _ = socket.recv_fds(self._broker, 64, 1,
                                                      socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                msg, fds = b"", []
                log.warning("tunnel exit: the RPC server's connection broker failed: %s", e)
            if not msg and not fds:  # EOF: the child is gone; its waiting streams time out in _on_timer
                log.warning("tunnel exit: the RPC server's connection broker is gone")
                self._poller.unregister(self._broker.fileno())
                return
            sock = socket.socket(fileno=fds[0]) if fds else None
            for extra in fds[1:]:  # the broker sends one at most; never leak more
                os.close(extra)
            if len(msg) != _BROKER_REPLY.size:
                self.stats.inc("tunnel_bad_frames")
                if sock is not None:
                    sock.close()
                continue
            rid, err = _BROKER_REPLY.unpack(msg)
            s, _ = self._awaiting.pop(rid, (None, 0.0))
            if s is None or self._streams.get(s.key) is not s:  # too late (timed out), or the stream closed
                if sock is not None:
                    sock.close()
                continue
            if sock is None or err or sock.type != socket.SOCK_STREAM:
                if sock is not None:
                    sock.close()
                self._remove(s, reset=False)
                self._connect_failed(s.peer, s.sid, err or errno.EIO)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # RPC is request/reply: Nagle only adds latency
            s.sock, s.fd = sock, sock.fileno()
            self._by_fd[s.fd] = s
            self._dirty.add(s)  # _update_polling watches it for POLLOUT: _on_connected reads SO_ERROR

    def _connect_failed(self, peer: bytes, sid: bytes, err: int) -> None:
        self.stats.inc("tunnel_connect_failed")
        log.warning("tunnel exit: cannot connect to %s:%d: %s", *self.target, os.strerror(err) if err else "?")
        self._zsock.send_multipart([peer, sid, CLOSE, b""])

    def _on_connected(self, s: _Stream) -> None:
        err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._remove(s, reset=False)
            self._connect_failed(s.peer, s.sid, err)
            return
        s.connecting = False
        s.established = True
        s.rx_allow = self.window_bytes
        self._send(s, ACK, _U32.pack(self.window_bytes))
        self._dirty.add(s)
        if s.peer_eof:  # the entry's client finished before we were connected
            self._flush(s)

    def _on_removed(self, s: _Stream) -> None:
        p = self._peers.get(s.peer)
        if p is not None:
            p.streams.discard(s.key)

    def _on_timer(self, now: float) -> None:
        if self._gate is not None:
            self._gate.tick()
        for rid, (s, asked) in list(self._awaiting.items()):
            if self._streams.get(s.key) is not s:  # closed while it waited: a late reply is closed at once
                del self._awaiting[rid]
            elif now - asked > self.broker_timeout_s:
                del self._awaiting[rid]
                self._remove(s, reset=False)
                self._connect_failed(s.peer, s.sid, errno.ETIMEDOUT)
        for peer, p in list(self._peers.items()):
            if now - p.last_heard > self.peer_timeout_s:
                if p.streams:
                    self.stats.inc("tunnel_peer_lost")
                    log.warning("tunnel exit: entry silent for %.0f s; resetting its %d streams",
                                now - p.last_heard, len(p.streams))
                    self._abort_peer(p, notify=True)
                del self._peers[peer]


class TunnelEntry(_TunnelEnd):
    """The server's end for one remote worker: TCP on 127.0.0.1, one CURVE DEALER to the exit.

    ``remote`` is the exit's endpoint (``tcp://host:port`` or ``host:port``). After :meth:`start`,
    :attr:`local_port` is the port to give llama.cpp (``127.0.0.1:local_port``). A connection
    accepted while no exit is connected is reset at once (:meth:`wait_connected` waits for one).

    Only ``uid`` (default: ours) may use it: a connection whose other end another uid owns, or no
    live socket at all, is reset before a byte of it is read, and counted
    (``tunnel_entry_foreign_uid``; ``tunnel_entry_closed_early`` for a client that had closed
    already, which is not warned about). What that leaves open: a process of the node's own user can
    still connect and speak RPC to the worker through the tunnel. That user is the node's trust
    domain already (it can ptrace the node, read its state directory and its token), so this
    keeps out only the machine's other users. Where /proc cannot say (not Linux), nothing is
    checked, and that is logged once.
    """

    def __init__(self, ctx: zmq.Context, keys: Keys, remote: str, stats: Stats, *, local_port: int = 0,
                 window_bytes: int = DEFAULT_WINDOW_BYTES, chunk_bytes: int = MAX_DATA_BYTES,
                 max_streams: int = DEFAULT_MAX_STREAMS, heartbeat_s: float = HEARTBEAT_S,
                 peer_timeout_s: float = PEER_TIMEOUT_S, uid: int | None = None,
                 own: tuple[bytes, bytes] | None = None, server_key: bytes | None = None):
        super().__init__("tunnel-entry", ctx, keys, stats, window_bytes=window_bytes, chunk_bytes=chunk_bytes,
                         max_streams=max_streams, heartbeat_s=heartbeat_s, peer_timeout_s=peer_timeout_s)
        self._own, self._server_key = own, server_key  # ours, and the worker's (from its signed record)
        self.remote = tcp(validate_endpoint(remote.removeprefix("tcp://")))
        self._want_port = local_port
        self._listener: socket.socket | None = None
        self._monitor: zmq.Socket | None = None
        self._connected = threading.Event()
        self._next_sid = 1
        self._epoch = 1
        self._last_heard = 0.0
        self._auth_warned = False
        self.local_port = 0
        self.uid = os.geteuid() if uid is None else uid
        self._uid_warned = False

    @property
    def connected(self) -> bool:
        """Whether the exit has completed the CURVE handshake (and not disconnected since)."""
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def _setup(self) -> None:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener = lst
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self._want_port))  # never another interface: this port speaks unauthenticated RPC
        lst.listen(64)
        lst.setblocking(False)
        self.local_port = lst.getsockname()[1]
        sock = configure(self.ctx.socket(zmq.DEALER))
        self._zsock = sock
        sock.sndhwm = sock.rcvhwm = 0  # per-stream credit bounds what is queued
        sock.immediate = 1  # queue nothing while no exit is connected: a stream either goes through or is reset
        sock.routing_id = b"T" + os.urandom(15)  # fixed across reconnects, so the exit can match our epoch
        curve_client(sock, self.keys, self._own, self._server_key)
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        sock.connect(self.remote)
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._poller.register(lst.fileno(), zmq.POLLIN)

    def _close_extra(self) -> None:
        self._connected.clear()
        if self._monitor is not None:
            try:
                self._zsock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _send(self, s: _Stream | None, kind: bytes, payload: bytes = b"") -> bool:
        if self._zsock is None:
            return False
        try:
            self._zsock.send_multipart([s.sid if s is not None else _CONTROL, kind, payload], zmq.NOBLOCK)
            return True
        except zmq.Again:  # IMMEDIATE and no connection: the exit is gone, and the streams with it
            if s is not None and self._streams.get(s.key) is s:
                self._lost("no connection to the exit")
            return False

    def _lost(self, why: str) -> None:
        self._connected.clear()
        self._epoch = self._epoch % 0xFFFFFFFF + 1
        n = self._abort_all(notify=False)
        if n:
            self.stats.inc("tunnel_peer_lost")
            log.warning("tunnel to %s: %s; reset %d streams", self.remote, why, n)

    def _on_other(self, obj, ev: int) -> None:
        if obj is self._monitor:
            self._on_monitor()
        elif self._listener is not None and obj == self._listener.fileno():
            self._accept()

    def _on_monitor(self) -> None:
        for _ in range(64):
            try:
                msg = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            event = msg["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._last_heard = time.monotonic()
                self._connected.set()
                self._auth_warned = False
                log.info("tunnel to %s: connected", self.remote)
                self._send(None, PING, _PING.pack(PROTOCOL_VERSION, self._epoch))
            elif event == zmq.EVENT_DISCONNECTED:
                self._lost("disconnected")
            else:
                self.stats.inc("tunnel_auth_failed")
                if not self._auth_warned:
                    self._auth_warned = True
                    log.warning("tunnel to %s: the handshake failed (a worker on another token?)", self.remote)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors, say: leave it in the backlog for now
                log.warning("tunnel entry: accept failed: %s", e)
                return
            if not self._own_user(conn):  # counted there; reset before a byte of it is read
                self._reset(conn)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self._streams) >= self.max_streams:
                self.stats.inc("tunnel_streams_refused")
                log.warning("tunnel entry: %d streams open already; refusing another", len(self._streams))
                self._reset(conn)
                continue
            sid = _U32.pack(self._next_sid)
            self._next_sid = self._next_sid % 0xFFFFFFFF + 1  # 0 is the connection's own stream
            s = _Stream(sid, sid, None, conn)
            s.rx_allow = self.window_bytes
            self._add_stream(s)
            if not self._send(s, OPEN, _OPEN.pack(PROTOCOL_VERSION, self.window_bytes, self._epoch)):
                self._abort(s, notify=False)

    def _own_user(self, conn: socket.socket) -> bool:
        """Whether the node's own user holds the other end of ``conn`` (an /proc lookup, ~0.1 ms
        for a few hundred sockets; llama.cpp opens a handful of connections per load)."""
        try:
            uid = peer_uid(conn)
        except Unknown as e:  # no /proc (not Linux): nothing to check against; say so once
            if not self._uid_warned:
                self._uid_warned = True
                log.warning("tunnel entry: cannot tell who connects (%s): any local user may use port %d",
                            e, self.local_port)
            return True
        except OSError:  # getpeername: the client has gone already
            uid = None
        # What stays open: the node's own user (or root, who can act as it) can still use the entry;
        # that user can already ptrace the node and read its token.
        if uid == self.uid:
            return True
        if uid is None:  # the client closed before we accepted it: no socket left to ask, so reset it quietly
            self.stats.inc("tunnel_entry_closed_early")
            return False
        self.stats.inc("tunnel_entry_foreign_uid")
        if not self._uid_warned:
            self._uid_warned = True
            log.warning("tunnel entry: refused a connection to port %d from uid %d (only uid %d may connect; "
                        "counted as tunnel_entry_foreign_uid)", self.local_port, uid, self.uid)
        return False

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
        except OSError:
            pass
        conn.close()

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        self._last_heard = time.monotonic()
        if len(frames) != 3:
            self._bad(f"{len(frames)} frames")
            return
        sid, kind = frames[0].bytes, frames[1].bytes
        if len(sid) != 4 or len(kind) != 1:
            self._bad("stream id or kind of the wrong size")
            return
        if sid == _CONTROL:
            if kind != PONG:
                self._bad(f"kind {kind.hex()} on stream 0")
            return
        s = self._streams.get(sid)
        if s is None:
            self.stats.inc("tunnel_unknown_stream")
        else:
            self._on_stream_frame(s, kind, frames[2])

    def _on_connected(self, s: _Stream) -> None:  # entry streams are accepted, never connecting
        pass

    def _on_timer(self, now: float) -> None:
        if not self._connected.is_set():
            return
        if self._streams and now - self._last_heard > self.peer_timeout_s:
            self._lost(f"the exit has been silent for {now - self._last_heard:.0f} s")
        self._send(None, PING, _PING.pack(PROTOCOL_VERSION, self._epoch))
