"""Only the node reaches its RPC server and its tunnel entries; other local users do not.

- A p2p worker's RPC child listens in a network namespace of its own and hands the node its
  connections through a socket pair (zswarm/engine/isolation.py): from the host, as root or as
  uid 65534, its port refuses, and nothing there answers an RPC HELLO.
- A tunnel entry resets a connection another uid owns before reading a byte of it
  (zswarm/sockowner.py reads the owner from /proc/net/tcp).
- Where the kernel allows no namespace (here: a seccomp filter that fails unshare(2)), the RPC
  server listens on the host's 127.0.0.1 as before, and the node says so.

Everything talks to 127.0.0.1 only. The uid-65534 parts need root (CI runs as root).
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import openai
import pytest
import zmq

from cluster import Cluster, child_state, free_port, wait_for
from test_engine import REPO, ChildProc, read_lines
from test_tunnel import Target, recv_all
from zswarm import sockowner
from zswarm.engine import isolation
from zswarm.token import Token
from zswarm.transport import Stats, ZapHandler
from zswarm.tunnel import TunnelEntry, TunnelExit

NOBODY = 65534


@functools.cache
def python_for_nobody() -> str:
    """A Python that uid 65534 may run (tox's .tox and pyenv's ~/.pyenv may be closed to it);
    the clients it runs need nothing but the standard library."""
    for cand in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            if subprocess.run([cand, "-I", "-c", ""], user=NOBODY, group=NOBODY, cwd="/",
                              capture_output=True, timeout=30).returncode == 0:
                return cand
        except OSError:
            continue
    pytest.skip("no Python that uid 65534 may run")
DEADLINE_S = 20.0
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as another user (uid 65534)")

# llama.cpp's RPC HELLO (protocol v7): command 14, the request's size (u64), 24 bytes of
# connection capabilities. A server answers the size of its reply, then major, minor, patch.
HELLO = b"\x0e" + struct.pack("<Q", 24) + bytes(24)


def rpc_hello(sock: socket.socket) -> bytes:
    """Send HELLO on ``sock``; what came back before EOF, a reset or 3 s of silence."""
    sock.settimeout(3.0)
    try:
        sock.sendall(HELLO)
        got = b""
        while len(got) < 11:
            d = sock.recv(64)
            if not d:
                break
            got += d
        return got
    except OSError:
        return b""


def answered(reply: bytes) -> bool:
    return len(reply) >= 11 and reply[8] == 7  # major version 7


# A client run as another user: connect to 127.0.0.1:PORT, say HELLO, print what happened.
OTHER_USER_CLIENT = textwrap.dedent("""
    import socket, struct, sys
    try:
        c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
    except OSError as e:
        print("connect", e.errno); sys.exit()
    c.settimeout(3)
    try:
        c.sendall(b"\\x0e" + struct.pack("<Q", 24) + bytes(24))
        got = b""
        while len(got) < 11:
            d = c.recv(64)
            if not d:
                break
            got += d
        print("reply", got.hex())
    except OSError as e:
        print("reset", e.errno)
""")


def as_other_user(port: int) -> str:
    """What a uid-65534 process gets from 127.0.0.1:``port`` (``connect``, ``reply HEX``, ``reset``)."""
    r = subprocess.run([python_for_nobody(), "-I", "-c", OTHER_USER_CLIENT, str(port)], user=NOBODY, group=NOBODY,
                       capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def other_user_answered(said: str) -> bool:
    return said.startswith("reply ") and answered(bytes.fromhex(said.split(" ", 1)[1]))


# --- the socket table, as a pure function ---

def _hex4(ip: str, port: int) -> str:
    return f"{struct.unpack('=I', socket.inet_aton(ip))[0]:08X}:{port:04X}"


def _hex6(ip: str, port: int) -> str:
    raw = socket.inet_pton(socket.AF_INET6, ip)
    return "".join(f"{w:08X}" for w in struct.unpack("=4I", raw)) + f":{port:04X}"


def _line(n: int, local: str, remote: str, state: str, uid: int, inode: int) -> str:
    return (f"{n:4d}: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 {uid:5d} "
            f"       0 {inode} 1 0000000000000000 20 4 30 10 -1")


HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"


def test_the_socket_table_parser_finds_the_live_owner_of_a_connection():
    entry, client, ghost = ("127.0.0.1", 40001), ("127.0.0.1", 51000), ("127.0.0.1", 51001)
    tcp = "\n".join([HEADER,
                     _line(0, _hex4(*entry), _hex4("0.0.0.0", 0), "0A", 0, 1111),  # the entry listening
                     _line(1, _hex4(*entry), _hex4(*client), "01", 0, 2222),  # our accepted end
                     _line(2, _hex4(*client), _hex4(*entry), "01", 1000, 3333),  # the client's end
                     _line(3, _hex4(*ghost), _hex4(*entry), "06", 0, 0),  # closed: TIME_WAIT says uid 0
                     "garbage line"])
    mapped = ("127.0.0.1", 52000)  # an IPv6 socket that connected to ::ffff:127.0.0.1
    tcp6 = "\n".join([HEADER, _line(0, _hex6("::ffff:127.0.0.1", 52000), _hex6("::ffff:127.0.0.1", 40001),
                                    "01", 1001, 4444)])
    assert list(sockowner.parse(tcp))[1] == (entry, client, 0, 2222)
    assert sockowner.owner([tcp, tcp6], client, entry) == 1000
    assert sockowner.owner([tcp, tcp6], mapped, entry) == 1001
    assert sockowner.owner([tcp, tcp6], ghost, entry) is None  # no live socket: nobody to trust
    assert sockowner.owner([tcp, tcp6], ("127.0.0.1", 9), entry) is None
    assert sockowner._address(_hex6("::1", 80)) == ("::1", 80)


@as_root
def test_peer_uid_of_real_connections():
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = lst.accept()
            with conn:
                assert sockowner.peer_uid(conn) == os.geteuid()
        code = ("import socket, sys; c = socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
                "print('up', flush=True); sys.stdin.read()")
        p = subprocess.Popen([python_for_nobody(), "-I", "-c", code, str(port)], user=NOBODY, group=NOBODY,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
        try:
            assert p.stdout.readline() == "up\n"
            conn, _ = lst.accept()
            with conn:
                assert sockowner.peer_uid(conn) == NOBODY
        finally:
            p.communicate("", timeout=10)


# --- the RPC child on its own ---

class RpcServer(ChildProc):
    """``python -m zswarm.engine.rpc_server`` on a free port; ``netns`` is READY's third word."""

    what = "rpc server"
    clean_exit = True

    def __init__(self, tmp: Path, *args: str, name: str, pass_fds: tuple[int, ...] = (),
                 prefix: list[str] | None = None):
        self.log_path = tmp / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "zswarm.engine.rpc_server",
                                      "--port", "0", "--threads", "1", *args],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, pass_fds=pass_fds)
        try:
            words = read_lines(self.proc, 20.0, self.read_log)[-1].split()
            self.port = int(words[1].rsplit(":", 1)[1])
            self.netns = words[3] if len(words) > 3 else ""
        except BaseException:
            self.close()
            raise

def broker_pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def ask_broker(mine: socket.socket, rid: int = 1) -> socket.socket:
    mine.send(isolation.REQUEST.pack(rid))
    msg, fds, _, _ = socket.recv_fds(mine, 64, 1)
    assert isolation.REPLY.unpack(msg) == (rid, 0) and len(fds) == 1, (msg, fds)
    s = socket.socket(fileno=fds[0])
    s.setblocking(True)
    return s


def test_the_rpc_server_in_its_own_namespace_answers_only_through_its_broker(tmp_path):
    plain = RpcServer(tmp_path, name="plain")  # the control: today's server, on the host's 127.0.0.1
    mine, theirs = broker_pair()
    try:
        with socket.create_connection(("127.0.0.1", plain.port), timeout=3) as c:
            assert answered(rpc_hello(c))  # the probe below would see a server that answers
        if os.geteuid() == 0:
            assert other_user_answered(as_other_user(plain.port))  # what issue 12 found
        plain.close()

        isolated = RpcServer(tmp_path, "--broker-fd", str(theirs.fileno()), name="isolated",
                             pass_fds=(theirs.fileno(),))
        try:
            assert isolated.netns == "private"
            with pytest.raises(ConnectionRefusedError):  # nothing listens there in the host's namespace
                socket.create_connection(("127.0.0.1", isolated.port), timeout=3)
            if os.geteuid() == 0:
                said = as_other_user(isolated.port)
                assert said.startswith("connect ") and not other_user_answered(said), said
            with ask_broker(mine) as c:  # the node's way in
                assert c.getpeername() == ("127.0.0.1", isolated.port)
                assert answered(rpc_hello(c))
        finally:
            isolated.close()
    finally:
        plain.close()
        mine.close()
        theirs.close()


# A prefix that runs a command where unshare(2) fails with EPERM (a seccomp filter, inherited by
# every child): how a kernel without unprivileged user namespaces looks to the RPC child.
NO_UNSHARE = textwrap.dedent("""
    import ctypes, os, sys
    NR = {"x86_64": 272, "aarch64": 97}[os.uname().machine]
    AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[os.uname().machine]
    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
    code = [(0x20, 0, 0, 4), (0x15, 0, 3, AUDIT_ARCH), (0x20, 0, 0, 0), (0x15, 0, 1, NR),
            (0x06, 0, 0, 0x00050000 | 1), (0x06, 0, 0, 0x7FFF0000)]
    prog = Prog(len(code), (Filter * len(code))(*[Filter(*c) for c in code]))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
    os.execv(sys.argv[1], sys.argv[1:])
""")
no_unshare = pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"),
                                reason="the seccomp filter knows x86_64 and aarch64 only")


@no_unshare
def test_without_namespaces_the_rpc_server_listens_as_before_and_says_so(tmp_path):
    mine, theirs = broker_pair()
    try:
        s = RpcServer(tmp_path, "--broker-fd", str(theirs.fileno()), name="shared",
                      pass_fds=(theirs.fileno(),), prefix=[sys.executable, "-c", NO_UNSHARE])
        try:
            assert s.netns == "shared"
            with ask_broker(mine) as c:  # the broker still works
                assert answered(rpc_hello(c))
            with socket.create_connection(("127.0.0.1", s.port), timeout=3) as c:
                assert answered(rpc_hello(c))  # and, as the warning says, so does everyone else
        finally:
            s.close()
        assert "every local user can reach it" in s.log_path.read_text()
    finally:
        mine.close()
        theirs.close()


# --- the tunnel exit with a broker ---

@pytest.fixture
def keys():
    return Token.generate().derive()


@pytest.fixture
def ctxs(keys):
    worker, server, stats = zmq.Context(), zmq.Context(), Stats()
    zap = ZapHandler(worker, keys, stats)
    zap.start()
    yield worker, server
    zap.stop()
    server.term()
    worker.term()


def test_the_exit_uses_the_brokers_connections_and_gives_up_on_a_silent_one(ctxs, keys):
    worker_ctx, server_ctx = ctxs
    ended = []

    def echo(conn: socket.socket) -> None:
        conn.settimeout(DEADLINE_S)
        while d := conn.recv(65536):
            conn.sendall(d)
        conn.close()  # as llama.cpp's RPC server does when its client leaves
        ended.append(conn)

    target = Target(echo)
    mine, theirs = broker_pair()
    wstats, sstats = Stats(), Stats()
    ex = TunnelExit(worker_ctx, keys, "127.0.0.1:0", ("127.0.0.1", target.port), wstats, broker=mine,
                    heartbeat_s=0.1, broker_timeout_s=0.3)
    ex.start()
    en = TunnelEntry(server_ctx, keys, ex.endpoint, sstats, heartbeat_s=0.1)
    en.start()
    try:
        assert en.wait_connected(DEADLINE_S)
        broker = isolation.serve_connects(theirs, ("127.0.0.1", target.port))
        with socket.create_connection(("127.0.0.1", en.local_port), timeout=DEADLINE_S) as c:
            c.sendall(b"x" * 100_000)
            got = b""
            while len(got) < 100_000:
                got += c.recv(65536)
            assert got == b"x" * 100_000
        wait_for(lambda: ex.stream_count == 0, DEADLINE_S, what="the exit to forget the stream")

        # A broker that does not answer (a child restarting): the stream fails, the client is reset
        theirs.shutdown(socket.SHUT_RDWR)  # the broker thread sees EOF and ends
        broker.join(DEADLINE_S)
        mine2, theirs2 = broker_pair()
        ex2 = TunnelExit(worker_ctx, keys, "127.0.0.1:0", ("127.0.0.1", target.port), wstats, broker=mine2,
                         heartbeat_s=0.1, broker_timeout_s=0.3)
        ex2.start()
        en2 = TunnelEntry(server_ctx, keys, ex2.endpoint, sstats, heartbeat_s=0.1)
        en2.start()
        try:
            assert en2.wait_connected(DEADLINE_S)
            before = wstats.snapshot().get("tunnel_connect_failed", 0)
            with socket.create_connection(("127.0.0.1", en2.local_port), timeout=DEADLINE_S) as c:
                assert recv_all(c) == (b"", False)  # reset once the exit gave up
            assert wstats.snapshot()["tunnel_connect_failed"] == before + 1
            # ... and its late answer is closed, not leaked: the target sees that connection end
            n = len(ended)
            request = theirs2.recv(64)
            late = socket.create_connection(("127.0.0.1", target.port))
            socket.send_fds(theirs2, [isolation.REPLY.pack(isolation.REQUEST.unpack(request)[0], 0)],
                            [late.fileno()])
            late.close()
            wait_for(lambda: len(ended) > n, DEADLINE_S, what="the exit to close the late connection")
            assert ex2.stream_count == 0
        finally:
            en2.stop()
            ex2.stop()
            theirs2.close()
    finally:
        en.stop()
        ex.stop()
        theirs.close()
        target.stop()


# --- whole nodes ---

@pytest.mark.slow
def test_a_worker_is_reachable_only_through_its_tunnel_and_an_entry_only_by_its_user(tmp_path):
    """One worker, one server using it: the split answers; the worker's RPC port refuses from the
    host; a uid-65534 client of the server's tunnel entry is reset, counted, and never forwarded."""
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        w = c.node("w", "worker", extra=["--mem", "2GiB", "--threads", "1"])
        s = c.node("s", "server", bootstrap=[w], extra=["--p2p", "--threads", "1", "--no-local-layers"])

        def split():
            st = s.admin("status")
            workers = (st.get("shard") or {}).get("workers") or []
            return child_state(st, "engine") == "ready" and workers and workers[0]["layers"] > 0 \
                and workers
        workers = wait_for(split, 90, 0.2, what="the model split over the worker")
        url = s.args[s.args.index("--address") + 1]
        out = openai.OpenAI(base_url=f"http://{url}/v1", api_key="x", max_retries=0, timeout=120) \
            .completions.create(model="smollm2-135m-instruct", prompt="One, two,", max_tokens=4, temperature=0)
        assert out.choices[0].text

        st = w.admin("status")
        assert st["rpc"]["netns"] == "private", st["rpc"]
        port = int(st["rpc"]["listen"].rsplit(":", 1)[1])
        pid = st["children"]["rpc"]["pid"]
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=3)
        if os.geteuid() == 0:
            said = as_other_user(port)
            assert said.startswith("connect "), said

            streams = lambda node: node.admin("status")["counters"].get("tunnel_streams", 0)  # noqa: E731
            w_before, s_before = streams(w), streams(s)
            entry_port = int(workers[0]["endpoint"].rsplit(":", 1)[1])
            said = as_other_user(entry_port)
            assert said.startswith("reset ") or said == "reply ", said  # reset unanswered
            counters = s.admin("status")["counters"]
            assert counters.get("tunnel_entry_foreign_uid") == 1, counters
            assert streams(s) == s_before and streams(w) == w_before  # no stream was opened for it
            assert "refused a connection to port" in s.log()
    finally:
        c.close()


@pytest.mark.slow
@no_unshare
def test_a_worker_without_namespaces_says_its_rpc_server_is_shared(tmp_path):
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        w = c.node("w", "worker", extra=["--threads", "1"], port=free_port(2),
                   prefix=[sys.executable, "-c", NO_UNSHARE])
        # "rpc" joins the status once the node has started its RPC child, a moment after the
        # admin socket first answers
        st = wait_for(lambda: (lambda st: st.get("rpc", {}).get("netns", "starting") != "starting" and st)(
            w.admin("status")), 30, 0.1, what="the worker's RPC server")
        assert st["rpc"]["netns"] == "shared", st["rpc"]
        assert st["counters"].get("rpc_server_shared_netns") == 1, st["counters"]
        assert "every local user can reach it" in w.log()
    finally:
        c.close()
