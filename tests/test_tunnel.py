"""The RPC byte-stream tunnel, end to end over real sockets on 127.0.0.1.

Each test builds: a target TCP server (an echo server, or one that misbehaves on purpose), a
TunnelExit in front of it, and a TunnelEntry in its own ZeroMQ context (as on another machine);
clients connect to the entry's local port. Teardown checks that no thread and no file descriptor
outlives the test.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from typing import Callable

import pytest
import zmq

from zmq.utils.monitor import parse_monitor_message

from cluster import wait_for
from zswarm import tunnel
from zswarm.token import Token
from zswarm.transport import Stats, ZapHandler, curve_client
from zswarm.tunnel import TunnelEntry, TunnelExit

DEADLINE_S = 20.0


def recv_all(sock: socket.socket, timeout_s: float = DEADLINE_S) -> tuple[bytes, bool]:
    """Read to EOF; (data, True) on EOF, (data, False) when the connection was reset."""
    sock.settimeout(timeout_s)
    chunks = []
    try:
        while True:
            d = sock.recv(1 << 20)
            if not d:
                return b"".join(chunks), True
            chunks.append(d)
    except ConnectionResetError:
        return b"".join(chunks), False


class Target:
    """A TCP server on 127.0.0.1 that runs ``handler(conn)`` in a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None]):
        self.handler = handler
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.1)
        self.port = self.lsock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="target-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.lsock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="target-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        except BaseException as e:  # an assertion in a handler: reported by the test
            self.errors.append(e)

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        for c in self.conns:
            c.close()
        self.lsock.close()
        assert not self._acceptor.is_alive() and not any(t.is_alive() for t in self._threads)


def echo(conn: socket.socket) -> None:
    conn.settimeout(DEADLINE_S)
    while True:
        d = conn.recv(1 << 20)
        if not d:
            break
        conn.sendall(d)
    conn.shutdown(socket.SHUT_WR)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Rig:
    """Two contexts (server and worker side), a ZAP handler on the worker's, and the pieces."""

    def __init__(self, keys):
        self.keys = keys
        self.stats = Stats()  # the exit's (worker) counters
        self.entry_stats = Stats()
        self.ctx = zmq.Context()
        self.entry_ctx = zmq.Context()
        self.zap = ZapHandler(self.ctx, keys, self.stats)
        self.zap.start()
        self.targets: list[Target] = []
        self.ends: list = []
        self.socks: list = []

    def target(self, handler=echo) -> Target:
        t = Target(handler)
        self.targets.append(t)
        return t

    def exit(self, target: Target | int, **kw) -> TunnelExit:
        port = target if isinstance(target, int) else target.port
        ex = TunnelExit(self.ctx, self.keys, "127.0.0.1:0", ("127.0.0.1", port), self.stats, **kw)
        ex.start()
        self.ends.append(ex)
        return ex

    def entry(self, ex: TunnelExit | str, keys=None, connect: bool = True, **kw) -> TunnelEntry:
        remote = ex if isinstance(ex, str) else ex.endpoint
        en = TunnelEntry(self.entry_ctx, keys or self.keys, remote, self.entry_stats, **kw)
        en.start()
        self.ends.append(en)
        if connect:
            assert en.wait_connected(DEADLINE_S), "the entry never completed the handshake"
        return en

    def client(self, en: TunnelEntry) -> socket.socket:
        c = socket.create_connection(("127.0.0.1", en.local_port), timeout=DEADLINE_S)
        self.socks.append(c)
        return c

    def zsock(self, kind: int, ctx=None) -> zmq.Socket:
        s = (ctx or self.entry_ctx).socket(kind)
        s.linger = 0
        self.socks.append(s)
        return s

    def close(self) -> None:
        for s in self.socks:
            s.close()
        for end in self.ends:
            assert end.stop(5), f"{end} did not stop"
        self.zap.stop()
        for t in self.targets:
            t.stop()
        for c in (self.entry_ctx, self.ctx):
            done = threading.Thread(target=c.term, daemon=True)
            done.start()
            done.join(5)
            assert not done.is_alive(), "a ZeroMQ socket leaked (context.term() hangs)"
        errors = [e for t in self.targets for e in t.errors]
        assert not errors, errors


@pytest.fixture
def rig():
    threads_before = set(threading.enumerate())
    fds_before = open_fds()
    r = Rig(Token.generate().derive())
    try:
        yield r
    finally:
        r.close()
        wait_for(lambda: not (set(threading.enumerate()) - threads_before), 5,
                 what=f"threads to end: {set(threading.enumerate()) - threads_before}")
        wait_for(lambda: open_fds() <= fds_before, 5, what="file descriptors to be closed")


def test_echo_through_the_tunnel(rig):
    target = rig.target()
    en = rig.entry(rig.exit(target))
    c = rig.client(en)
    c.sendall(b"hello, worker")
    assert c.recv(100) == b"hello, worker"
    c.shutdown(socket.SHUT_WR)
    assert recv_all(c) == (b"", True)  # the target's EOF came back
    snap = rig.stats.snapshot()
    assert snap["tunnel_streams"] == 1 and snap["tunnel_bytes_in"] == snap["tunnel_bytes_out"] == 13
    assert rig.entry_stats.snapshot()["tunnel_bytes_out"] == 13


def test_concurrent_streams_carry_bulk_data_both_ways(rig):
    n_streams, size = 4, 20 << 20
    target = rig.target()
    en = rig.entry(rig.exit(target))
    results: dict[int, tuple[str, str, bool]] = {}

    def run(i: int) -> None:
        data = os.urandom(size)
        c = socket.create_connection(("127.0.0.1", en.local_port), timeout=DEADLINE_S)
        got: list = []
        reader = threading.Thread(target=lambda: got.append(recv_all(c)))
        reader.start()
        view = memoryview(data)
        for off in range(0, size, 1 << 20):  # mixed write sizes, so messages do not line up with writes
            c.sendall(view[off:off + (1 << 20) - 7 * i])
            c.sendall(view[off + (1 << 20) - 7 * i:off + (1 << 20)])
        c.shutdown(socket.SHUT_WR)
        reader.join(DEADLINE_S)
        c.close()
        back, eof = got[0] if got else (b"", False)
        results[i] = (hashlib.sha256(data).hexdigest(), hashlib.sha256(back).hexdigest(), eof)

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S * 2)
    assert not any(t.is_alive() for t in threads)
    elapsed = time.monotonic() - t0
    assert len(results) == n_streams
    for i, (sent, back, eof) in results.items():
        assert sent == back and eof, f"stream {i} corrupted or cut"
    assert target.accepted == n_streams
    snap = rig.stats.snapshot()
    assert snap["tunnel_bytes_in"] == snap["tunnel_bytes_out"] == n_streams * size
    assert snap.get("tunnel_bad_frames", 0) == 0 and rig.entry_stats.snapshot().get("tunnel_bad_frames", 0) == 0
    wait_for(lambda: en.stream_count == 0, DEADLINE_S, what="the entry to forget finished streams")
    print(f"{n_streams} x {size >> 20} MiB each way in {elapsed:.2f} s")


def test_client_close_reaches_the_target(rig):
    seen: list = []

    def record(conn):
        seen.append(recv_all(conn))
        conn.close()  # as llama.cpp's RPC server does when its client leaves

    target = rig.target(record)
    en = rig.entry(rig.exit(target))
    c = rig.client(en)
    c.sendall(b"last words")
    # Accepted first: a client already closed when the entry accepts it owns no socket any more,
    # so the entry cannot tell whose it was, and resets it (sockowner.py)
    wait_for(lambda: en.stream_count == 1, DEADLINE_S, what="the entry to accept the client")
    c.close()
    wait_for(lambda: seen, DEADLINE_S, what="the target to see EOF")
    assert seen[0] == (b"last words", True)
    wait_for(lambda: en.stream_count == 0 and rig.ends[0].stream_count == 0, DEADLINE_S,
             what="both ends to forget the stream")


def test_target_close_reaches_the_client(rig):
    def greet_and_hang_up(conn):
        conn.sendall(b"bye")
        conn.close()

    en = rig.entry(rig.exit(rig.target(greet_and_hang_up)))
    c = rig.client(en)
    assert recv_all(c) == (b"bye", True)
    c.close()
    wait_for(lambda: en.stream_count == 0 and rig.ends[0].stream_count == 0, DEADLINE_S,
             what="both ends to forget the stream")


def test_target_reset_resets_the_client(rig):
    def reset(conn):
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    en = rig.entry(rig.exit(rig.target(reset)))
    c = rig.client(en)
    c.sendall(b"x")
    assert recv_all(c) == (b"", False)  # a reset, not a clean EOF: a cut stream must not look complete
    assert rig.stats.snapshot()["tunnel_streams_reset"] == 1  # counted before the CLOSE left


def test_slow_reader_does_not_make_the_tunnel_buffer(rig):
    total = 200 << 20
    release = threading.Event()
    digest: list = []

    def slow_sink(conn):
        assert release.wait(DEADLINE_S)
        h, n = hashlib.sha256(), 0
        conn.settimeout(DEADLINE_S)
        while True:
            d = conn.recv(64 << 10)  # small reads: a slower reader than the sender
            if not d:
                break
            h.update(d)
            n += len(d)
        digest.append((n, h.hexdigest()))

    ex = rig.exit(rig.target(slow_sink))
    en = rig.entry(ex)
    c = rig.client(en)
    c.setblocking(False)
    block = os.urandom(1 << 20)
    expect = hashlib.sha256()
    rss0 = rss_bytes()

    # Phase 1: the target reads nothing. The sender must stall after a window plus kernel buffers.
    sent, last_progress = 0, time.monotonic()
    while time.monotonic() - last_progress < 0.5:
        try:
            n = c.send(block)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        expect.update(block[:n])
        sent += n
        last_progress = time.monotonic()
        assert sent < 64 << 20, "the tunnel kept accepting bytes nobody reads"
    stalled_at = sent
    assert ex.buffered_bytes <= ex.window_bytes

    # Phase 2: the target reads, slowly; the rest of the 200 MB goes through, bounded all along.
    release.set()
    c.setblocking(True)
    c.settimeout(DEADLINE_S)
    view = memoryview(block)
    tail = view[sent % len(block):]
    c.sendall(tail)
    expect.update(tail)
    sent += len(tail)
    peak_rss = rss_bytes()
    while sent < total:
        c.sendall(block)
        expect.update(block)
        sent += len(block)
        peak_rss = max(peak_rss, rss_bytes()) if sent % (16 << 20) == 0 else peak_rss
    c.shutdown(socket.SHUT_WR)
    wait_for(lambda: digest, DEADLINE_S, what="the target to read everything")
    assert digest[0] == (sent, expect.hexdigest())
    limit = ex.window_bytes + tunnel.MAX_DATA_BYTES
    assert ex.max_buffered_bytes <= limit and en.max_buffered_bytes <= limit
    assert peak_rss - rss0 < 64 << 20, f"RSS grew by {(peak_rss - rss0) >> 20} MiB"
    print(f"stalled after {stalled_at >> 20} MiB; exit buffered at most {ex.max_buffered_bytes >> 10} KiB; "
          f"RSS +{(peak_rss - rss0) >> 20} MiB")


def reset_at_once(en: TunnelEntry) -> bool:
    """Connect to the entry and read: True if the connection was reset without a byte."""
    try:
        c = socket.create_connection(("127.0.0.1", en.local_port), timeout=DEADLINE_S)
    except ConnectionResetError:  # the reset can beat connect() back to user space
        return True
    with c:
        return recv_all(c) == (b"", False)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_another_token_opens_nothing(rig):
    target = rig.target()
    ex = rig.exit(target)
    stranger = Token.generate().derive()
    en = rig.entry(ex, keys=stranger, connect=False)
    wait_for(lambda: rig.entry_stats.snapshot().get("tunnel_auth_failed", 0) >= 1, DEADLINE_S,
             what="the handshake to fail")
    assert not en.connected
    assert reset_at_once(en)  # there is no tunnel to carry it

    # A raw stranger too, speaking the protocol with the wrong key, or with no CURVE at all.
    open_frame = [b"\x00\x00\x00\x01", tunnel.OPEN, struct.pack(">BII", 1, 1 << 20, 1)]
    raw = rig.zsock(zmq.DEALER)
    curve_client(raw, stranger)
    plain = rig.zsock(zmq.DEALER)
    for s in (raw, plain):
        mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        rig.socks.insert(0, mon)
        s.connect(ex.endpoint)
        s.send_multipart(open_frame)  # IMMEDIATE is off: it waits for a handshake that never succeeds
        assert mon.poll(DEADLINE_S * 1000), "no handshake event"
        event = parse_monitor_message(mon.recv_multipart())["event"]
        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED
        s.disable_monitor()
    assert target.accepted == 0 and ex.stream_count == 0
    assert "tunnel_streams" not in rig.stats.snapshot()


def recv_kind(sock: zmq.Socket, kind: bytes) -> list[bytes]:
    """The next message of ``kind`` (others skipped), with a deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if sock.poll(100):
            frames = sock.recv_multipart()
            if frames[-2] == kind:
                return frames
    raise AssertionError(f"no {kind!r} within {DEADLINE_S} s")


def test_hostile_frames_from_a_member_are_dropped(rig):
    target = rig.target()
    ex = rig.exit(target, window_bytes=64 << 10)
    bad = rig.zsock(zmq.DEALER)
    curve_client(bad, rig.keys)
    bad.connect(ex.endpoint)
    sid = b"\x00\x00\x00\x07"
    ok_open = struct.pack(">BII", 1, 1 << 20, 1)
    garbage = [
        [b"x"], [b"a", b"b"], [sid, tunnel.DATA, b"x", b"extra"],
        [b"\x01\x02\x03", tunnel.DATA, b"x"], [sid, b"\x02\x02", b"x"], [sid, b"\xff", b""],
        [b"\x00\x00\x00\x00", tunnel.DATA, b"x"], [b"\x00\x00\x00\x00", tunnel.PING, b"garbage"],
        [b"\x00\x00\x00\x09", tunnel.DATA, b"to nowhere"],
        [sid, tunnel.OPEN, b"short"], [sid, tunnel.OPEN, struct.pack(">BII", 1, 0, 1)],
        [sid, tunnel.OPEN, struct.pack(">BII", 99, 1 << 20, 1)],
    ]
    for frames in garbage:
        bad.send_multipart(frames)
    # Then a stream that breaks the rules once it is open: a bad ACK, then more DATA than its credit.
    recv_kind(bad, tunnel.CLOSE)  # the refusals of the bad OPENs
    recv_kind(bad, tunnel.CLOSE)
    bad.send_multipart([sid, tunnel.OPEN, ok_open])
    assert recv_kind(bad, tunnel.ACK) == [sid, tunnel.ACK, struct.pack(">I", 64 << 10)]
    bad.send_multipart([sid, tunnel.ACK, b"abc"])
    bad.send_multipart([sid, tunnel.OPEN, ok_open])  # again, while open
    bad.send_multipart([sid, tunnel.DATA, b"z" * (100 << 10)])  # 100 KiB > the 64 KiB window
    assert recv_kind(bad, tunnel.CLOSE) == [sid, tunnel.CLOSE, b""]
    wait_for(lambda: ex.stream_count == 0, DEADLINE_S, what="the exit to reset the rule breaker")
    snap = rig.stats.snapshot()
    assert snap["tunnel_bad_frames"] >= 12 and snap["tunnel_unknown_stream"] >= 1
    assert ex.alive

    # The exit still serves an honest entry.
    c = rig.client(rig.entry(ex))
    c.sendall(b"still here?")
    assert c.recv(100) == b"still here?"


def test_exit_resets_streams_of_an_old_epoch_or_a_silent_entry(rig):
    seen: list = []
    target = rig.target(lambda conn: seen.append(recv_all(conn)))
    ex = rig.exit(target, heartbeat_s=0.05, peer_timeout_s=0.5)
    raw = rig.zsock(zmq.DEALER)
    curve_client(raw, rig.keys)
    raw.routing_id = b"Tentry"
    raw.connect(ex.endpoint)
    raw.send_multipart([b"\x00\x00\x00\x01", tunnel.OPEN, struct.pack(">BII", 1, 1 << 20, 1)])
    recv_kind(raw, tunnel.ACK)
    raw.send_multipart([b"\x00\x00\x00\x00", tunnel.PING, struct.pack(">BI", 1, 1)])  # same epoch: no change
    recv_kind(raw, tunnel.PONG)
    assert ex.stream_count == 1
    raw.send_multipart([b"\x00\x00\x00\x00", tunnel.PING, struct.pack(">BI", 1, 2)])  # it reconnected
    wait_for(lambda: seen, DEADLINE_S, what="the old epoch's stream to be reset")
    assert ex.stream_count == 0 and seen[0] == (b"", False)

    raw.send_multipart([b"\x00\x00\x00\x02", tunnel.OPEN, struct.pack(">BII", 1, 1 << 20, 2)])
    recv_kind(raw, tunnel.ACK)
    t0 = time.monotonic()
    assert recv_kind(raw, tunnel.CLOSE)[0] == b"\x00\x00\x00\x02"  # then silence: reset after the timeout
    assert 0.25 < time.monotonic() - t0 < 5
    wait_for(lambda: len(seen) == 2 and ex.stream_count == 0, DEADLINE_S,
             what="the silent entry's stream to be reset")
    assert rig.stats.snapshot()["tunnel_peer_lost"] == 1


def test_hostile_frames_from_an_exit_are_dropped(rig):
    """A fake exit (a member) answers the entry with garbage; the entry survives and resets."""
    fake = rig.zsock(zmq.ROUTER, rig.ctx)
    fake.curve_server = True
    fake.curve_secretkey, fake.curve_publickey = rig.keys.curve_secret, rig.keys.curve_public
    fake.zap_domain = b"zswarm"
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    en = rig.entry(f"127.0.0.1:{port}")
    c = rig.client(en)
    assert fake.poll(DEADLINE_S * 1000)
    peer, sid, kind, _ = fake.recv_multipart()
    while kind != tunnel.OPEN:  # skip the PING
        peer, sid, kind, _ = fake.recv_multipart()
    for frames in ([b"x"], [sid, b"\xee", b""], [sid, tunnel.ACK, b"12345"], [b"\x00\x00\x00\x00", tunnel.DATA, b""],
                   [b"\x00\x00\x00\x05", tunnel.DATA, b"nobody"], [sid, tunnel.DATA, b"early"],
                   [sid, tunnel.DATA, b"y" * (tunnel.MAX_DATA_BYTES + 1)]):
        fake.send_multipart([peer, *frames])
    wait_for(lambda: en.stream_count == 0, DEADLINE_S, what="the entry to reset the stream")
    assert recv_all(c) == (b"early", False)
    assert rig.entry_stats.snapshot()["tunnel_bad_frames"] >= 5 and en.alive
    assert recv_kind(fake, tunnel.CLOSE)[1] == sid


def test_unreachable_target_resets_the_client(rig):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    en = rig.entry(rig.exit(port))
    c = rig.client(en)
    assert recv_all(c) == (b"", False)
    assert rig.stats.snapshot()["tunnel_connect_failed"] == 1


def test_exit_going_away_resets_clients_at_once(rig):
    target = rig.target()
    ex = rig.exit(target)
    en = rig.entry(ex, peer_timeout_s=60)  # not the heartbeat: the disconnect itself must do it
    c = rig.client(en)
    c.sendall(b"ping")
    assert c.recv(10) == b"ping"
    t0 = time.monotonic()
    assert ex.stop(5)
    assert recv_all(c) == (b"", False)
    assert time.monotonic() - t0 < 2
    wait_for(lambda: target.conns and is_closed(target.conns[0]), DEADLINE_S,
             what="the exit's target connection to close")
    wait_for(lambda: not en.connected, DEADLINE_S, what="the entry to notice")
    assert reset_at_once(en)  # no exit: new connections are reset, not queued


def test_entry_going_away_closes_the_target_connection(rig):
    first: list = []
    seen: list = []
    target = rig.target(lambda conn: (first.append(conn.recv(3)), seen.append(recv_all(conn))))
    ex = rig.exit(target, heartbeat_s=0.1, peer_timeout_s=0.5)
    en = rig.entry(ex)
    c = rig.client(en)
    c.sendall(b"abc")
    wait_for(lambda: first == [b"abc"], DEADLINE_S, what="the bytes to arrive")
    assert en.stop(5)
    wait_for(lambda: seen, DEADLINE_S, what="the target to see the end")
    wait_for(lambda: ex.stream_count == 0, DEADLINE_S, what="the exit to forget the stream")


def test_entry_limits_its_streams(rig):
    en = rig.entry(rig.exit(rig.target()), max_streams=2)
    a, b = rig.client(en), rig.client(en)
    for s in (a, b):
        s.sendall(b"k")
        assert s.recv(1) == b"k"
    assert reset_at_once(en)
    assert rig.entry_stats.snapshot()["tunnel_streams_refused"] == 1


def test_exit_only_connects_to_loopback():
    keys, stats, ctx = Token.generate().derive(), Stats(), zmq.Context()
    try:
        for target in (("10.0.0.1", 50052), ("0.0.0.0", 1), ("localhost", 1), ("127.0.0.1", 0)):
            with pytest.raises(ValueError):
                TunnelExit(ctx, keys, "127.0.0.1:0", target, stats)
        TunnelExit(ctx, keys, "127.0.0.1:0", ("::1", 5), stats).stop()  # constructed, never started
    finally:
        ctx.term()


def is_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_a_failed_bind_is_raised_by_start(rig):
    ex = rig.exit(rig.target())
    taken = TunnelExit(rig.ctx, rig.keys, ex.endpoint, ("127.0.0.1", 1), rig.stats)
    with pytest.raises(zmq.ZMQError):
        taken.start()
    assert not taken.alive
    with pytest.raises(ValueError):
        TunnelEntry(rig.entry_ctx, rig.keys, "no-port", rig.entry_stats)
