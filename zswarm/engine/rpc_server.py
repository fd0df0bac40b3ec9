"""The llama.cpp RPC server child: lends this machine's CPU and memory to another node's model.

    python -m zswarm.engine.rpc_server --port 50052 [--host 127.0.0.1] [--threads N]
        [--mem BYTES] [--cache-dir DIR] [--allow-remote]

It serves llama.cpp's RPC protocol by calling ``ggml_backend_rpc_start_server`` in the
``libggml-rpc.so`` that llama-cpp-python ships: the call upstream's ``rpc-server`` binary makes,
so the wire protocol is upstream's (v7.0.0 in llama-cpp-python 0.3.36) and an upstream client or
server of the same llama.cpp version interoperates with it.

Security: the RPC protocol has no authentication and a history of remote-code-execution bugs, so
the server binds 127.0.0.1 (any loopback address) only; the cluster reaches it through a CURVE
tunnel. Any other ``--host`` is refused unless ``--allow-remote`` is given (static mode on a
trusted network), and then it is warned about loudly. With ``--broker-fd N`` (a p2p worker) it
first moves into a network namespace of its own, where no other local user can reach its
127.0.0.1, and hands the node connections through the socket N (:mod:`.isolation`); where the
kernel does not allow that, it listens on the host's 127.0.0.1 as before and warns. READY's
third word says which: ``private`` or ``shared`` (no third word without ``--broker-fd``).

Proof: before it listens, the server computes one small graph on the CPU device it lends
(:mod:`.selftest`, ``STAGE proving``), so a build that cannot run on this CPU dies by SIGILL
before READY (its ``FAULT`` line names the library) instead of under a server's first token.

Handshake: once this process holds the listening socket (seen in /proc, not by connecting to
it), exactly one line ``READY <host:port> <free bytes> [private|shared]`` goes to the original stdout. fd 1 is
pointed at fd 2 before anything else, because ggml prints its banner to stdout. ``--port 0``
takes a free port; READY names it. A server that cannot bind (or load ggml, or compute) exits
``EX_CONFIG`` (78) without READY: a restart would fail the same way. When the node asks for it,
a ``BEAT`` line follows about once a second for the life of the process (:func:`.child.start_beat`).

Memory: a client asks the server for its device memory (RPC_CMD_GET_DEVICE_MEMORY) and the server
answers what ``ggml_backend_dev_memory`` says for the CPU device: in this llama.cpp version the
machine's total physical memory, as both free and total. The C API has no way to change that
answer, so ``--mem`` caps what zswarm announces instead (READY, then the worker's ledger record);
the engine always loads with an explicit ``tensor_split`` computed from the announced numbers
(equal shares in static ``--rpc-servers`` mode, where nothing is announced), so the server's own
figure never decides the split. READY's free bytes are
``min(MemAvailable, ggml's free figure, --mem)``.

Threads: ``rpc-server`` sits in the C call for the life of the process (ctypes releases the GIL);
nothing can stop that call, so the main thread waits for SIGTERM/SIGINT, or for the parent to
die, and then leaves with ``os._exit``. (Were the C call on the main thread, Python could never
run a signal handler.)

The ggml ctypes bindings it calls live in :mod:`zswarm.engine.ggml`, shared with the engine; like
that module, this one must never import llama_cpp, so that a worker does not load libllama at all.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import logging
import os
import socket
import struct
import sys
import threading
import time

from ..meminfo import memory_bytes
from . import fault, isolation
from .child import EX_CONFIG, StopFlag, parent_pid, stage, start_beat, take_stdout
from .ggml import GGML_BACKEND_DEVICE_TYPE_CPU, device_memory, ggml
from .selftest import compute_on

log = logging.getLogger("zswarm.rpc_server")

LISTEN_TIMEOUT_S = 10.0  # how long the server may take to bind before we give up (it takes ms)
POLL_S = 0.02  # how often the listening socket is looked for in /proc
PARENT_POLL_S = 0.5  # how often the parent's liveness is checked


# --- the listening socket, seen from /proc ---

def listening_sockets(pid: int | str = "self") -> list[tuple[str, int]]:
    """(IPv4 address, port) of every TCP socket process ``pid`` holds in the LISTEN state.

    Read from /proc (the process's socket inodes, matched in its network namespace's
    /proc/net/tcp), so nothing connects to the server to find out. IPv4 only: the RPC server
    never opens anything else.
    """
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)  # the header
        for line in f:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: TCP_LISTEN
                ip_hex, port_hex = local.split(":")
                found.append((socket.inet_ntoa(struct.pack("<I", int(ip_hex, 16))), int(port_hex, 16)))
    return found


# --- main ---

def _bytes(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m zswarm.engine.rpc_server",
                                description="zswarm's llama.cpp RPC server (started by a worker node, not by hand)")
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on (0: any free port; READY names it)")
    p.add_argument("--host", default="127.0.0.1",
                   help="IPv4 address (or localhost) to bind (default 127.0.0.1; anything but loopback "
                        "needs --allow-remote)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (static mode on a trusted network: NO authentication)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for computing (default: all cores)")
    p.add_argument("--mem", type=_bytes, default=None, help="cap on the free memory announced, in bytes")
    p.add_argument("--cache-dir", default=None,
                   help="keep received tensors here, so a reload does not send the weights again")
    p.add_argument("--broker-fd", type=int, default=None,
                   help="an inherited AF_UNIX socket (SOCK_SEQPACKET) on which the node asks for connections; "
                        "with it the server listens inside a network namespace of its own")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be between 0 and 65535 (got {args.port})")
    if args.host == "localhost":  # ggml takes a literal address only
        args.host = "127.0.0.1"
    try:
        addr = ipaddress.IPv4Address(args.host)
    except ValueError:
        p.error(f"--host must be an IPv4 address (llama.cpp's RPC server binds IPv4 only), not {args.host!r}")
    if not addr.is_loopback and not args.allow_remote:
        p.error(f"refusing to listen on {args.host}: llama.cpp's RPC server has no authentication, so it "
                f"listens on 127.0.0.1 only and the cluster reaches it through an encrypted tunnel "
                f"(pass --allow-remote to expose it anyway, on a network you trust)")
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.broker_fd is not None and not addr.is_loopback:
        p.error("--broker-fd serves a loopback server only")
    return args


def main(argv: list[str] | None = None) -> int:
    handshake = take_stdout()
    fault.install(handshake.fileno())
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format=f"%(asctime)s rpc-server[{os.getpid()}] %(levelname)s %(message)s")
    netns = ""  # READY's third word: "private" (a namespace of our own), "shared" (the host's)
    if args.broker_fd is not None:  # first: no thread may run yet (isolation.py says why)
        why = isolation.isolate()
        netns = "shared" if why else "private"
        if why:
            log.warning("cannot give the RPC server a network namespace of its own (%s): it listens on the "
                        "host's 127.0.0.1, where every local user can reach it, and llama.cpp's RPC has no "
                        "authentication", why)
    stop = StopFlag()
    parent = parent_pid()
    start_beat(handshake)  # no figures: what it serves, the engine on the other end measures

    # Each failure before READY is one a restart cannot fix: EX_CONFIG, and the node stops.
    cache_dir = None
    if args.cache_dir:
        try:
            os.makedirs(args.cache_dir, exist_ok=True)
        except OSError as e:
            log.error("cannot create the cache folder %s: %s", args.cache_dir, e)
            return EX_CONFIG
        cache_dir = os.path.abspath(args.cache_dir).encode()
    try:
        g = ggml()
    except OSError as e:
        log.error("cannot load llama.cpp's libraries: %s", e)
        return EX_CONFIG
    cpu = g.dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not cpu:
        log.error("ggml has no CPU device")
        return EX_CONFIG
    stage(handshake, "proving")
    try:
        compute_on(cpu)
    except (RuntimeError, OSError, AttributeError) as e:
        log.error("the CPU cannot compute with this llama.cpp build: %s", e)
        return EX_CONFIG
    devices = (ctypes.c_void_p * 1)(cpu)
    endpoint = f"{args.host}:{args.port}".encode()
    busy = _cannot_bind(args.host, args.port)
    if busy:  # ggml would only say "Failed to create server socket"
        log.error("cannot listen on %s:%d: %s", args.host, args.port, busy)
        return EX_CONFIG

    server = threading.Thread(target=g.rpc_start_server, name="rpc-server", daemon=True,
                              args=(endpoint, cache_dir, args.threads, 1, devices))
    server.start()
    bound = _wait_listening(args.host, args.port, server)
    if bound is None:
        log.error("cannot listen on %s:%d (is the port in use?)", args.host, args.port)
        return _exit(EX_CONFIG)

    if not ipaddress.IPv4Address(args.host).is_loopback:
        log.warning("!!! WARNING: the llama.cpp RPC server is listening on %s:%d WITHOUT ANY AUTHENTICATION. "
                    "Anyone who can reach that address can use this machine's memory and CPU, and llama.cpp's "
                    "RPC server has had remote-code-execution bugs. Use this only on a network you trust; "
                    "zswarm's p2p mode keeps it on 127.0.0.1 behind an encrypted tunnel. !!!", *bound)
    if args.broker_fd is not None:
        try:
            channel = socket.socket(fileno=args.broker_fd)
        except OSError as e:
            log.error("--broker-fd %d: %s", args.broker_fd, e)
            return _exit(EX_CONFIG)
        isolation.serve_connects(channel, bound)
    free = min(v for v in (device_memory(cpu)[0], memory_bytes()[1] or None, args.mem) if v is not None)
    log.info("serving llama.cpp RPC on %s:%d with %d thread(s); announcing %d MiB free%s",
             bound[0], bound[1], args.threads, free >> 20,
             f"; tensor cache in {args.cache_dir}" if cache_dir else "")
    handshake.write(f"READY {bound[0]}:{bound[1]} {free}{' ' + netns if netns else ''}\n")
    handshake.flush()

    while not stop.wait(PARENT_POLL_S):
        if not server.is_alive():
            log.error("the RPC server stopped on its own")
            return _exit(1)
        if os.getppid() != parent:
            log.warning("parent process %d is gone; stopping", parent)
            break
    log.info("stopped")
    return _exit(0)


def _cannot_bind(host: str, port: int) -> str:
    """Why ``host:port`` cannot be bound now ("" if it can), tried as ggml binds (SO_REUSEADDR)."""
    if port == 0:
        return ""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return ""


def _wait_listening(host: str, port: int, server: threading.Thread) -> tuple[str, int] | None:
    """This process's listening (address, port) once the server has bound; None if it gave up."""
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while time.monotonic() < deadline:
        for addr, p in listening_sockets():
            if addr == host and (p == port or port == 0):
                return addr, p
        if not server.is_alive():  # ggml_backend_rpc_start_server returns when it cannot bind
            return None
        time.sleep(POLL_S)
    return None


def _exit(code: int) -> int:
    """Leave now: the C server cannot be stopped, and running destructors under it could crash."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
