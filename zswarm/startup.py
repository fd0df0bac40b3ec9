"""What a node checks and takes before it starts anything: its model file and its HTTP socket.

Owns :class:`StartError` (a start-up mistake: one line for the user and the exit status),
:func:`check_model`, :func:`listen_http` and :func:`raise_nofile`. Both run before any actor or child starts, so that
a missing model or an address in use ends the node at once with one clear line, instead of a
child that fails at every restart while the node runs on and systemd never learns of it.

The HTTP socket is bound here, in the node, and handed to gunicorn as an inherited descriptor
(``--bind fd://N``, see http/gunicorn_conf.py): gunicorn binding it itself would try five times a
second apart and then exit, and the supervisor would restart it forever. Held by the node for its
life, the socket also keeps the port across gunicorn restarts (clients queue in its backlog
instead of being refused). Nothing here may import pykka or zmq.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket

from .engine.gguf import NotAModel, check_model_file
from .engine.model import ModelMissing, default_model_path

log = logging.getLogger(__name__)

HTTP_BACKLOG = 2048  # gunicorn's own default backlog
# Descriptors a node wants: a connection per peer link, the strangers' connections that
# zswarm/gate.py lets in while they prove themselves (64 per tcp socket), the HTTP clients, and
# llama.cpp's files. ``zswarm doctor`` warns below it too.
MIN_NOFILE = 4096


class StartError(Exception):
    """The node cannot start: ``str()`` is the one line to print, ``status`` the exit status
    (2: a setting that no retry can fix, as for bad flags; 1: could not run, as for a port in use)."""

    def __init__(self, line: str, status: int = 1):
        super().__init__(line)
        self.status = status


def check_model(model: str | None) -> str:
    """The path of the model to serve (``model``, or the embedded one), once its file is a
    readable GGUF file; StartError (status 2) naming the problem otherwise."""
    try:
        path = model or default_model_path()
        check_model_file(path)
    except (ModelMissing, NotAModel) as e:
        raise StartError(str(e), 2) from None
    return path


def listen_http(address: str, what: str = "--address") -> socket.socket:
    """A TCP socket bound to ``address`` ("host:port", "[v6]:port") and listening, for gunicorn
    to inherit. SO_REUSEADDR as gunicorn sets it (a restarted node rebinds at once past TIME_WAIT;
    it never lets two listeners share a port). StartError if it cannot be bound."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, ValueError) as e:
        raise StartError(f"cannot listen on {address} ({what}): {getattr(e, 'strerror', None) or e}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(HTTP_BACKLOG)
    except OSError as e:
        sock.close()
        hint = " (it is not an address of this host)" if e.errno == errno.EADDRNOTAVAIL else ""
        raise StartError(f"cannot listen on {address} ({what}): {e.strerror or e}{hint}") from None
    return sock


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one (what systemd's and most shells' soft 1024
    leaves unused), and warn once if even that is below :data:`MIN_NOFILE`. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < MIN_NOFILE:
        log.warning("open files limit is %d (a node wants %d): under a flood of connections the node "
                    "refuses more of them; raise it with ulimit -n or LimitNOFILE= in the systemd unit",
                    soft, MIN_NOFILE)
    return soft


P2P_PORT_TRIES = 20  # port pairs tried after the default one (7342, 7344, ...)


def free_p2p_listen(listen: str) -> str:
    """``listen`` if its port and the next are free, else the first free pair above (two at a
    time: the gossip port and the gateway's or tunnel's next to it). For the default address
    only, so that a join command pasted on a machine that already runs a node works; an address
    given explicitly that is taken stays an error (the node says so in one line)."""
    import socket

    host, port = listen.rsplit(":", 1)
    bind_host = host.strip("[]") if host not in ("*", "") else "0.0.0.0"
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    for p in range(int(port), int(port) + 2 * (P2P_PORT_TRIES + 1), 2):
        socks = []
        try:
            for q in (p, p + 1):
                s = socket.socket(family, socket.SOCK_STREAM)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq binds
                s.bind((bind_host, q))
            return f"{host}:{p}"
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    return listen  # none free: the node's own bind says why
