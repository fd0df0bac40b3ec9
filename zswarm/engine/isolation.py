"""A private network namespace for the RPC server child, and the broker that hands the node its connections.

llama.cpp's RPC server has no authentication, and 127.0.0.1 is shared by every local user: a
server on the host's loopback answers anyone on the machine. So a p2p worker's RPC child moves
itself into a network namespace of its own before it starts anything (:func:`isolate`), brings
that namespace's ``lo`` up and listens on its 127.0.0.1, which nothing outside the namespace can
reach. The node still needs connections to it: it holds one end of a private ``AF_UNIX``
socket pair, the child inherits the other, and for every request the child's broker thread
(:func:`serve_connects`) starts a TCP connection inside the namespace and sends the connected
socket back with ``SCM_RIGHTS``. The node's tunnel exit then uses that socket as if it had
connected it itself: bytes go straight between the tunnel and the RPC server, with no copy in
this process.

Namespaces: as root, ``unshare(CLONE_NEWNET)``; otherwise (or where root lacks CAP_SYS_ADMIN,
as in a default container) ``CLONE_NEWUSER | CLONE_NEWNET``, the user namespace mapping this
process's own uid and gid onto themselves. Where neither is allowed (unprivileged user
namespaces disabled, a seccomp profile), :func:`isolate` changes nothing and says why: the server
then listens on the host's 127.0.0.1 as before, reachable by local users, and the node warns.
The attempt is made first in a forked copy of this process, because a user namespace can be
entered but not left: a namespace in which ``lo`` then cannot be brought up (a security module
that strips the new namespace's capabilities) would leave the server nowhere to listen.

Both must happen while this process has one thread (``unshare`` changes the calling thread
only, and ``CLONE_NEWUSER`` refuses a threaded process): call :func:`isolate` first in main.

Wire (SOCK_SEQPACKET, one message each): the node sends a request id (u64); the child answers
the id and an errno (u32), with the socket attached when the errno is 0. The socket's connect
may still be in progress (it is non-blocking): the node watches it for POLLOUT and reads
SO_ERROR, as it does for a connect of its own. Standard library only: the RPC child imports this.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
import threading

log = logging.getLogger("zswarm.rpc_server")

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in a 24-byte union
REQUEST = struct.Struct(">Q")  # node -> child: request id
REPLY = struct.Struct(">QI")  # child -> node: request id, errno (0: the socket is attached)


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _map_ids(uid: int, gid: int) -> None:
    """In a new user namespace: be the same uid and gid as outside (unmapped, we would be nobody)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")  # required before an unprivileged gid_map
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _lo_up() -> None:
    """Bring ``lo`` up (a new namespace's loopback is down, and without it 127.0.0.1 does not exist)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        name, flags = _IFREQ.unpack(fcntl.ioctl(s, _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0)))
        if not flags & _IFF_UP:
            fcntl.ioctl(s, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def _enter(flags: int) -> None:
    uid, gid = os.geteuid(), os.getegid()
    _unshare(flags)
    if flags & CLONE_NEWUSER:
        _map_ids(uid, gid)
    _lo_up()


def _tries() -> list[int]:
    plain = [CLONE_NEWNET] if os.geteuid() == 0 else []
    return plain + [CLONE_NEWUSER | CLONE_NEWNET]


def _probe(flags: int) -> str:
    """Try ``flags`` in a forked copy of this process; "" if it worked, else why not."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the copy: one thread, like us; it only tries, reports and leaves
        os.close(r)
        try:
            _enter(flags)
            msg = b""
        except OSError as e:
            msg = (e.strerror or str(e)).encode()[:200]
        except BaseException as e:  # noqa: BLE001 (whatever it was, the parent must hear it)
            msg = repr(e).encode()[:200]
        os.write(w, msg or b"ok")
        os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            said = f.read().decode(errors="replace")
    finally:
        os.waitpid(pid, 0)
    return "" if said == "ok" else (said or "the probe died")


def isolate() -> str:
    """Move this single-threaded process into a network namespace of its own, ``lo`` up.

    Returns "" when done, else why it could not (this process is then unchanged).
    """
    if threading.active_count() > 1:
        return "bug: called with threads running"  # unshare would move only the calling thread
    why = []
    for flags in _tries():
        problem = _probe(flags)
        if not problem:
            _enter(flags)  # proven in the copy; a failure now is a bug and raises
            return ""
        why.append(f"{'user+network' if flags & CLONE_NEWUSER else 'network'} namespace: {problem}")
    return "; ".join(why)


def serve_connects(channel: socket.socket, target: tuple[str, int]) -> threading.Thread:
    """Start the broker thread: each request on ``channel`` gets a TCP socket connecting to ``target``.

    The thread ends when the node closes its end (EOF) or the channel fails.
    """
    def run() -> None:
        while True:
            try:
                req = channel.recv(64)
            except OSError as e:
                log.warning("connection broker: %s; stopping", e)
                return
            if not req:
                return  # the node is gone
            if len(req) != REQUEST.size:
                continue  # the node never sends anything else
            (rid,) = REQUEST.unpack(req)
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            conn.setblocking(False)  # the node polls it: never wait here for a slow accept
            err = conn.connect_ex(target)
            try:
                if err in (0, errno.EINPROGRESS):
                    socket.send_fds(channel, [REPLY.pack(rid, 0)], [conn.fileno()])
                else:
                    channel.send(REPLY.pack(rid, err))
            except OSError as e:
                log.warning("connection broker: %s; stopping", e)
                return
            finally:
                conn.close()  # the node holds its own copy now

    t = threading.Thread(target=run, name="connection-broker", daemon=True)
    t.start()
    return t
