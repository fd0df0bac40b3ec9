"""Who owns the other end of a loopback TCP connection: read from the kernel's tables in /proc/net.

A tunnel entry listens on 127.0.0.1 for the node's own engine (llama.cpp's RPC client), but any
local user can connect to 127.0.0.1, and TCP has no SO_PEERCRED. Both ends of a loopback
connection are in this network namespace, though, so the connecting socket is a line of
/proc/net/tcp (or tcp6, for an IPv4-mapped client): local address = our peer, remote address =
us, with the uid that created it and its inode. :func:`peer_uid` finds that line.

A line whose inode is 0 belongs to no process any more (closed: orphaned, or TIME_WAIT, whose
lines even say uid 0): it is treated as not found, so that a client cannot connect, write, close
and leave a root-looking ghost behind. Linux only; elsewhere :func:`peer_uid` says it cannot tell.
Standard library only.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Iterator

TABLES = ("/proc/self/net/tcp", "/proc/self/net/tcp6")

Address = tuple[str, int]  # (IPv4 or IPv6 text, IPv4-mapped IPv6 given as IPv4; port)


class Unknown(Exception):
    """The socket tables cannot be read here (not Linux, /proc not mounted)."""


def _address(field: str) -> Address:
    """``0100007F:1F90`` (IPv4) or 32 hex digits and a port (IPv6), as the kernel prints them:
    the address as 32-bit words in this machine's byte order, the port as a number."""
    host, port = field.split(":")
    raw = b"".join(struct.pack("=I", int(host[i:i + 8], 16)) for i in range(0, len(host), 8))
    if len(raw) == 4:
        return socket.inet_ntoa(raw), int(port, 16)
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped or ip), int(port, 16)


def parse(text: str) -> Iterator[tuple[Address, Address, int, int]]:
    """(local, remote, uid, inode) of each socket in the text of /proc/net/tcp or tcp6."""
    lines = text.splitlines()
    for line in lines[1:]:  # the first is the header
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            yield _address(fields[1]), _address(fields[2]), int(fields[7]), int(fields[9])
        except ValueError:
            continue


def owner(texts: list[str], peer: Address, me: Address) -> int | None:
    """The uid of the live socket at ``peer`` connected to ``me``, from the tables' ``texts``;
    None if there is none (gone, or never there)."""
    for text in texts:
        for local, remote, uid, inode in parse(text):
            if inode and local == peer and remote == me:
                return uid
    return None


def peer_uid(conn: socket.socket) -> int | None:
    """The uid that owns the other end of ``conn``, an accepted loopback TCP connection; None if
    no live socket of this namespace is its other end. Raises :class:`Unknown` where /proc
    cannot say."""
    peer, me = _normal(conn.getpeername()), _normal(conn.getsockname())
    texts = []
    for path in TABLES:  # tcp first: tcp6 only holds a client that connected from an IPv6 socket
        try:
            with open(path) as f:
                texts.append(f.read())
        except FileNotFoundError:
            if not texts:
                raise Unknown(f"{path} does not exist") from None
            continue
        except OSError as e:
            raise Unknown(f"{path}: {e}") from None
        uid = owner(texts[-1:], peer, me)
        if uid is not None:
            return uid
    return None


def _normal(addr: tuple) -> Address:
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), int(addr[1])
