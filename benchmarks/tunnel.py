"""Raw throughput and latency of the RPC tunnel, side by side with what it is built from.

Variants, all on 127.0.0.1, run one after another in rounds (``--rounds``, interleaved, so a
change of machine load hits them all alike; the median round is reported):

- *tcp*: one plain loopback TCP connection (what llama.cpp RPC uses without zswarm).
- *zmq*: a bare ZeroMQ PAIR pair, no security (reference only).
- *curve*: a bare CURVE PAIR pair (ZAP handler running), messages of ``--chunk-kib``.
- *tunnel*: TCP -> TunnelEntry -> CURVE -> TunnelExit -> TCP, one connection.
- *tunnel xN*: the same with ``--streams`` connections at once (aggregate).
- *tunnel brokered*: the exit takes each connection from a connection broker over a Unix socket
  pair, as a p2p worker's exit does (its RPC server listens in a network namespace of its own,
  zswarm/engine/isolation.py; the broker runs in a thread here): the bytes take the same path.

Each moves ``--mb`` MB one way (a sender writes ``--chunk-kib`` blocks, a sink counts them);
the clock runs from the first write to the sink's last byte. "CPU" is the process's CPU time
(every thread, ZeroMQ's I/O threads included) per GB moved. Both ends run in this one process,
each ZeroMQ end in its own context (as on two machines): on a small machine the tunnel's extra
threads compete with the crypto for the same cores, which a real two-machine tunnel does not.

Latency: ``--pings`` round trips of a 64-byte message through an echo server, plain TCP and
through the tunnel (median and 99th percentile, microseconds): llama.cpp's per-token traffic is
small request/reply messages, so this is what the tunnel costs tokens/s.

Run from the repository root:
    .venv/bin/python benchmarks/tunnel.py [--mb 512] [--rounds 3] [--write]
``--write`` replaces this benchmark's section of docs/BENCHMARKS.md (between its markers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine as common_machine, replace_in_doc  # noqa: E402
from zswarm.engine.isolation import serve_connects  # noqa: E402
from zswarm.token import Token  # noqa: E402
from zswarm.transport import Stats, ZapHandler, curve_client, curve_server  # noqa: E402
from zswarm.tunnel import TunnelEntry, TunnelExit  # noqa: E402

START, END = "<!-- tunnel:start -->", "<!-- tunnel:end -->"
DEADLINE_S = 120.0  # per transfer; a stuck variant fails instead of hanging


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Sink:
    """A TCP server on 127.0.0.1 that counts what each connection sends until EOF, then closes."""

    def __init__(self, expect: int, conns: int = 1):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.expect, self.conns = expect, conns
        self.counts: list[int] = []
        self.done = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self.lsock.settimeout(DEADLINE_S)
        for _ in range(self.conns):
            conn, _ = self.lsock.accept()
            t = threading.Thread(target=self._count, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _count(self, conn: socket.socket) -> None:
        buf, n = bytearray(1 << 20), 0
        conn.settimeout(DEADLINE_S)
        while True:
            k = conn.recv_into(buf)
            if not k:
                break
            n += k
        conn.close()
        self.counts.append(n)
        if len(self.counts) == self.conns:
            self.done.set()

    def close(self) -> None:
        self.lsock.close()
        for t in self._threads:
            t.join(DEADLINE_S)


def push(port: int, total: int, chunk: bytes) -> None:
    c = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    for _ in range(total // len(chunk)):
        c.sendall(chunk)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)  # EOF once the sink has everything
    c.close()


def tcp_transfer(port: int, total: int, chunk: bytes, streams: int, sink: Sink) -> float:
    """Seconds to move ``total`` bytes to ``sink`` through ``port`` over ``streams`` connections."""
    each = total // streams
    senders = [threading.Thread(target=push, args=(port, each, chunk), daemon=True) for _ in range(streams)]
    t0 = time.perf_counter()
    for t in senders:
        t.start()
    if not sink.done.wait(DEADLINE_S):
        raise TimeoutError("the transfer did not finish")
    dt = time.perf_counter() - t0
    for t in senders:
        t.join(DEADLINE_S)
    assert sorted(sink.counts) == [each] * streams, (sink.counts, each)
    return dt


def run_tcp(total: int, chunk: bytes, keys) -> float:
    sink = Sink(total)
    try:
        return tcp_transfer(sink.port, total, chunk, 1, sink)
    finally:
        sink.close()


def run_pair(total: int, chunk: bytes, keys, curve: bool) -> float:
    tx_ctx, rx_ctx, stats = zmq.Context(), zmq.Context(), Stats()
    zap = ZapHandler(rx_ctx, keys, stats)
    zap.start()
    rx, tx = rx_ctx.socket(zmq.PAIR), tx_ctx.socket(zmq.PAIR)
    try:
        for s in (rx, tx):
            s.linger = 0
        if curve:
            curve_server(rx, keys)
            curve_client(tx, keys)
        port = rx.bind_to_random_port("tcp://127.0.0.1")
        tx.connect(f"tcp://127.0.0.1:{port}")
        tx.send(b"hello")
        assert rx.poll(DEADLINE_S * 1000), "the PAIR pair did not connect"
        rx.recv()
        n = total // len(chunk)
        got: list[int] = []

        def drain() -> None:
            size = 0
            for _ in range(n):
                if not rx.poll(DEADLINE_S * 1000):
                    break
                size += len(rx.recv(copy=False))
            got.append(size)

        t = threading.Thread(target=drain, daemon=True)
        t0 = time.perf_counter()
        t.start()
        for _ in range(n):
            tx.send(chunk)
        t.join(DEADLINE_S)
        dt = time.perf_counter() - t0
        assert got == [total], got
        return dt
    finally:
        rx.close()
        tx.close()
        zap.stop()
        tx_ctx.term()
        rx_ctx.term()


class TunnelRig:
    """ZAP + exit (worker side) and entry (server side), each in its own context."""

    def __init__(self, keys, target_port: int, brokered: bool = False):
        self.worker_ctx, self.server_ctx, self.stats = zmq.Context(), zmq.Context(), Stats()
        self.zap = ZapHandler(self.worker_ctx, keys, self.stats)
        self.zap.start()
        broker = self.channel = None
        if brokered:
            broker, self.channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            serve_connects(self.channel, ("127.0.0.1", target_port))
        self.exit = TunnelExit(self.worker_ctx, keys, "127.0.0.1:0", ("127.0.0.1", target_port), self.stats,
                               broker=broker)
        self.exit.start()
        self.entry = TunnelEntry(self.server_ctx, keys, self.exit.endpoint, self.stats)
        self.entry.start()
        if not self.entry.wait_connected(10):
            raise TimeoutError("the tunnel did not connect")

    def close(self) -> None:
        self.entry.stop()
        self.exit.stop()
        if self.channel is not None:
            self.channel.close()
        self.zap.stop()
        self.server_ctx.term()
        self.worker_ctx.term()


def run_tunnel(total: int, chunk: bytes, keys, streams: int, brokered: bool = False) -> float:
    sink = Sink(total, streams)
    rig = TunnelRig(keys, sink.port, brokered)
    try:
        return tcp_transfer(rig.entry.local_port, total, chunk, streams, sink)
    finally:
        rig.close()
        sink.close()


def echo_server() -> tuple[socket.socket, threading.Thread]:
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        lsock.settimeout(DEADLINE_S)
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            d = conn.recv(65536)
            if not d:
                break
            conn.sendall(d)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return lsock, t


def ping_pong(port: int, pings: int) -> list[float]:
    c = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg, rtts = os.urandom(64), []
    for _ in range(pings):
        t0 = time.perf_counter()
        c.sendall(msg)
        got = b""
        while len(got) < len(msg):
            got += c.recv(64 - len(got))
        rtts.append((time.perf_counter() - t0) * 1e6)
    c.close()
    return rtts


def latency(keys, pings: int, tunnel: bool, brokered: bool = False) -> list[float]:
    lsock, t = echo_server()
    rig = TunnelRig(keys, lsock.getsockname()[1], brokered) if tunnel else None
    try:
        return ping_pong(rig.entry.local_port if rig else lsock.getsockname()[1], pings)
    finally:
        t.join(DEADLINE_S)
        if rig:
            rig.close()
        lsock.close()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def machine() -> str:
    return common_machine(f"libzmq {zmq.zmq_version()}", f"pyzmq {zmq.__version__}",
                          unknown_cpu=platform.processor() or "?")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=512, help="MB (MiB) moved per variant and round")
    ap.add_argument("--chunk-kib", type=int, default=256, help="write and message size")
    ap.add_argument("--streams", type=int, default=4, help="connections in the multi-stream tunnel variant")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--pings", type=int, default=2000, help="round trips per latency figure")
    ap.add_argument("--write", action="store_true", help="write the results into docs/BENCHMARKS.md")
    args = ap.parse_args()

    keys = Token.generate().derive()
    chunk = os.urandom(args.chunk_kib * 1024)
    total = args.mb * (1 << 20) // len(chunk) // args.streams * args.streams * len(chunk)
    variants: dict[str, Callable[[], float]] = {
        "tcp": lambda: run_tcp(total, chunk, keys),
        "zmq": lambda: run_pair(total, chunk, keys, curve=False),
        "curve": lambda: run_pair(total, chunk, keys, curve=True),
        "tunnel": lambda: run_tunnel(total, chunk, keys, 1),
        f"tunnel x{args.streams}": lambda: run_tunnel(total, chunk, keys, args.streams),
        "tunnel brokered": lambda: run_tunnel(total, chunk, keys, 1, brokered=True),
    }
    load = os.getloadavg()[0]
    rates: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            c0 = cpu_s()
            dt = fn()
            rates[name].append(total / dt / 1e6)
            cpus[name].append((cpu_s() - c0) / (total / 1e9))
            print(f"round {r + 1}: {name:15s} {rates[name][-1]:8.0f} MB/s  CPU {cpus[name][-1]:.2f} s/GB", flush=True)
    lat = {"tcp": latency(keys, args.pings, False), "tunnel": latency(keys, args.pings, True),
           "tunnel brokered": latency(keys, args.pings, True, brokered=True)}

    med = {k: statistics.median(v) for k, v in rates.items()}
    rows = []
    for name in variants:
        rows.append(f"| {name} | {med[name]:.0f} | {min(rates[name]):.0f}-{max(rates[name]):.0f} | "
                    f"{statistics.median(cpus[name]):.2f} | {med[name] / med['tcp']:.2f} | "
                    f"{med[name] / med['curve']:.2f} |")
    lat_rows = [f"| {k} | {statistics.median(v):.0f} | {pct(v, 0.99):.0f} |" for k, v in lat.items()]
    ratio_line = (f"tunnel/tcp {med['tunnel'] / med['tcp']:.2f}, tunnel/curve {med['tunnel'] / med['curve']:.2f}, "
                  f"tunnel x{args.streams}/curve {med[f'tunnel x{args.streams}'] / med['curve']:.2f}; "
                  f"latency tunnel/tcp {statistics.median(lat['tunnel']) / statistics.median(lat['tcp']):.1f}x")
    print(ratio_line)
    text = f"""{START}
## RPC tunnel throughput

Command (repository root): `{command_line()}`
Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {machine()}.
Load average (1 min) before the run: {load:.2f}.

{total / 1e6:.0f} MB one way per variant, {len(chunk) >> 10} KiB writes/messages, {args.rounds} interleaved
rounds (median, and the range). *tcp*: plain loopback TCP; *zmq*: bare ZeroMQ PAIR, no security;
*curve*: bare CURVE PAIR; *tunnel*: TCP -> TunnelEntry -> CURVE DEALER/ROUTER -> TunnelExit -> TCP,
one connection; *tunnel x{args.streams}*: {args.streams} connections at once; *tunnel brokered*: the exit's
connection handed over by a broker, as on a p2p worker. CPU: process CPU time per GB
(all threads). Both ends share this machine's cores; see `benchmarks/tunnel.py`. MB/s swings with
whatever else the machine runs (see the load); CPU s/GB is the steadier figure.

| variant | MB/s (median) | MB/s (range) | CPU s/GB | / tcp | / curve |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Round trip of a 64-byte message through an echo server ({args.pings} pings):

| path | median (us) | p99 (us) |
|---|---:|---:|
{chr(10).join(lat_rows)}

Ratios: {ratio_line}.
{END}
"""
    print(text)
    if args.write:
        replace_in_doc(START, END, text.rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
