"""Admission control for a bound tcp socket: strangers cannot hold a node's descriptors.

A CURVE socket accepts every TCP connection first and only then learns, from the handshake,
whether the other side holds the token. An outsider who opens connections and sends nothing
therefore holds one descriptor each for as long as the handshake may last, and a node out of
descriptors dies: libzmq's ipc listener aborts the process when ``accept`` fails with EMFILE
(``src/ipc_listener.cpp``, 4.3.5 and master), which the next admin or HTTP connection triggers.

Three bounds, all from the socket's own thread:

- :data:`HANDSHAKE_MS` (``ZMQ_HANDSHAKE_IVL``): libzmq closes a connection that has not
  completed its handshake within it. A peer on a LAN needs milliseconds, one on a 400 ms-RTT
  link about 1.2 s (three round trips); an idle stranger is gone within 3 s.
- A cap on *unproven* connections, per socket and per source address. A connection is unproven
  while it is younger than the handshake limit: libzmq would have closed it by then unless it
  authenticated (a v1 monitor reports a handshake's success without saying which connection it
  was, so age is the proof). Past a cap, a new connection is shut down at once
  (``shutdown(2)`` on libzmq's descriptor: libzmq sees the end of the stream and closes it
  itself, so the descriptor is never closed behind its back).
- A closed door: while the socket is at its cap, a socket filter (classic BPF, no privilege
  needed) makes the kernel drop every new connection attempt before it is accepted, so a flood
  cannot even reach ``accept``; clients see a lost SYN and try again. The door opens again as
  soon as the unproven connections fall to half the cap.

Token holders are not bounded here: what a member may do is the ledger's business.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

from .transport import Stats

log = logging.getLogger(__name__)

HANDSHAKE_MS = 3000
PER_SOCKET = 64  # unproven connections a socket holds at once (a cluster joining at once stays under it)
PER_SOURCE = 32  # ... and from one address: a few nodes behind one NAT, or a test's loopback cluster
EVENTS = (zmq.EVENT_LISTENING | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
          | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

SO_ATTACH_FILTER, SO_DETACH_FILTER = 26, 27
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # BPF_RET|BPF_K 0: accept no bytes of any packet


@dataclass
class Limits:
    per_socket: int = PER_SOCKET
    per_source: int = PER_SOURCE
    window_s: float = HANDSHAKE_MS / 1000


def prepare(sock: zmq.Socket) -> zmq.Socket:
    """Set the handshake limit; call before ``bind`` (libzmq copies options at that moment)."""
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    return sock


@dataclass
class Admission:
    """Which young connections a socket holds, and whether a new one fits (pure: owns no socket)."""
    limits: Limits
    young: dict[int, tuple[str, float]] = field(default_factory=dict)  # fd -> (source, accepted at)

    def expire(self, now: float) -> None:
        old = [fd for fd, (_, t) in self.young.items() if now - t >= self.limits.window_s]
        for fd in old:
            del self.young[fd]

    def admit(self, fd: int, source: str, now: float) -> str:
        """Record a new connection; returns "" if it may stay, else why it may not."""
        self.expire(now)
        self.young.pop(fd, None)  # a descriptor number libzmq reused
        if len(self.young) >= self.limits.per_socket:
            return "socket"
        if sum(1 for s, _ in self.young.values() if s == source) >= self.limits.per_source:
            return "source"
        self.young[fd] = (source, now)
        return ""

    def gone(self, fd: int) -> None:
        self.young.pop(fd, None)

    def full(self) -> bool:
        return len(self.young) >= self.limits.per_socket

    def relaxed(self) -> bool:
        return len(self.young) <= self.limits.per_socket // 2

    def sources(self) -> Counter:
        return Counter(s for s, _ in self.young.values())


class Gate:
    """Watches one bound tcp socket through its monitor and keeps strangers within the limits.

    Loop thread only (the socket's owner). ``install`` before ``bind``; ``on_monitor`` is the
    monitor socket's handler; ``tick`` (about once a second) reopens a closed door."""

    def __init__(self, name: str, stats: Stats, limits: Limits | None = None):
        self.name, self._stats = name, stats
        self.adm = Admission(limits or Limits())
        self._listeners: list[int] = []
        self._closed = False
        self._prog = None  # the BPF program's memory, kept alive while attached

    def install(self, sock: zmq.Socket) -> zmq.Socket:
        prepare(sock)
        return sock.get_monitor_socket(EVENTS)

    def on_monitor(self, frames: list[bytes], monitor: zmq.Socket | None = None) -> None:
        """One event, then every event already queued: decisions are made on the net state, so
        a descriptor that libzmq closed and reused in the meantime is never acted on."""
        events = [parse_monitor_message(frames)]
        while monitor is not None and len(events) < 1000:
            try:
                events.append(parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK)))
            except zmq.Again:
                break
        accepted: dict[int, None] = {}
        for ev in events:
            kind, value = ev["event"], ev["value"]
            if kind == zmq.EVENT_LISTENING:
                self._listeners.append(value)
            elif kind == zmq.EVENT_ACCEPTED:
                accepted[value] = None
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                accepted.pop(value, None)
                self.adm.gone(value)
            elif kind & HANDSHAKE_FAILED:
                self._stats.inc("handshake_failed")
        now = time.monotonic()
        for fd in accepted:
            self._judge(fd, now)
        if self.adm.full():
            self._door(closed=True)

    def tick(self) -> None:
        self.adm.expire(time.monotonic())
        if self._closed and self.adm.relaxed():
            self._door(closed=False)

    def _judge(self, fd: int, now: float) -> None:
        try:
            s = socket.socket(fileno=fd)  # no dup: libzmq keeps the descriptor, detach() below
        except OSError:
            return
        try:
            if s.family not in (socket.AF_INET, socket.AF_INET6):
                return  # not the connection the event named: the number was reused
            try:
                source = s.getpeername()[0]
            except OSError:
                return  # already gone
            why = self.adm.admit(fd, source, now)
            if why:
                self._stats.inc(f"gate_refused_{self.name}")
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            s.detach()

    def _door(self, closed: bool) -> None:
        if closed == self._closed:
            return
        for fd in self._listeners:
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                continue
            try:
                if closed:
                    self._prog = ctypes.create_string_buffer(_DROP_ALL)
                    fprog = struct.pack("HxxxxxxQ", 1, ctypes.addressof(self._prog))
                    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
                else:
                    s.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("%s: cannot %s the door: %s", self.name, "close" if closed else "open", e)
            finally:
                s.detach()
        self._closed = closed
        if closed:
            self._stats.inc(f"gate_closed_{self.name}")
            log.warning("%s: %d connections are still proving themselves; refusing new ones for now (%s)",
                        self.name, len(self.adm.young),
                        ", ".join(f"{src} {n}" for src, n in self.adm.sources().most_common(3)))
        else:
            log.info("%s: accepting connections again", self.name)
