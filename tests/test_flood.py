"""An outsider floods every tcp port of a node with idle connections (issue 12).

The attack that took a node down: a few hundred TCP connections that never send a byte, to the
gossip, gateway and HTTP ports of a node whose descriptor limit is 256. Each held a descriptor
for as long as a CURVE handshake may last (30 s by default), and when the table was full the
next connection on the node's own ipc sockets (an admin call, an HTTP worker) made libzmq
abort the process. Here the attacker keeps its connections open the whole time: whenever the
node drops one, it opens another. Throughout, the node must stay up, answer its API and its
admin socket, and keep its peer; its idle connections must go within seconds. A worker's ports
(gossip and its tunnel exit) get the same.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from cluster import free_port, wait_for

pytestmark = pytest.mark.slow

PER_PORT = 300
LIMIT = 256
ATTACK_S = 10.0


class Attacker(threading.Thread):
    """Holds ``PER_PORT`` silent connections to each port; reopens what the other side closes."""

    def __init__(self, ports: list[int]):
        super().__init__(daemon=True)
        self.ports = ports
        self.socks: dict[socket.socket, int] = {}
        self.opened = self.dropped = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def _open(self, port: int) -> None:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            return
        self.socks[s] = port
        self.opened += 1

    def run(self) -> None:
        for port in self.ports:
            for _ in range(PER_PORT):
                self._open(port)
        while not self.stop.is_set():
            self.sweep(reopen=True)
            time.sleep(0.05)

    def sweep(self, reopen: bool) -> None:
        with self.lock:
            socks = list(self.socks)
            for i in range(0, len(socks), 500):
                readable, _, _ = select.select(socks[i:i + 500], [], [], 0)
                for s in readable:
                    try:
                        data = s.recv(1)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if data:
                        continue  # a greeting (ZMTP): still open
                    port = self.socks.pop(s)
                    s.close()
                    self.dropped += 1
                    if reopen:
                        self._open(port)

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        for s in self.socks:
            s.close()


def established(ports: tuple[int, ...]) -> int:
    """Connections the kernel holds established on these local ports (a peer's links included)."""
    flt = " or ".join(f"sport = :{p}" for p in ports)
    out = subprocess.run(["ss", "-tanH", "state", "established", f"( {flt} )"], capture_output=True,
                         text=True, check=True).stdout
    return len(out.splitlines())


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_connection_flood_under_a_low_descriptor_limit(cluster):
    http_port = free_port()
    victim = cluster.node("victim", role="server", extra=["--p2p", "--federated", "--threads", "1",
                                                           "--address", f"127.0.0.1:{http_port}"],
                          port=free_port(2), prefix=["prlimit", f"--nofile={LIMIT}:{LIMIT}", "--"])
    peer = cluster.node("peer", role="worker", bootstrap=[victim])
    wait_for(lambda: "peer" in victim.alive_peer_names(), 30, what="the victim to hear its peer")
    health = f"http://127.0.0.1:{http_port}/healthz"
    wait_for(lambda: urllib.request.urlopen(health, timeout=2).status == 200, 20, what="the API")
    baseline = open_fds(victim.proc.pid)

    attacker = Attacker([victim.port, victim.port + 1, http_port])
    attacker.start()
    slowest, checks = 0.0, 0
    try:
        end = time.monotonic() + ATTACK_S
        while time.monotonic() < end:
            assert victim.running(), victim.log()[-3000:]
            t0 = time.monotonic()
            assert urllib.request.urlopen(health, timeout=2).status == 200
            slowest = max(slowest, time.monotonic() - t0)
            assert "peer" in victim.alive_peer_names()  # a new ipc connection: what used to abort
            checks += 1
            time.sleep(0.3)
    finally:
        attacker.stop.set()
        attacker.join(5)
    print(f"\nflood: {attacker.opened} connections opened, {attacker.dropped} dropped by the node; "
          f"{checks} checks, slowest /healthz {slowest * 1000:.0f} ms; fds {baseline} before")
    assert attacker.dropped > 2 * PER_PORT  # the node let go of strangers during the attack

    # The idle connections still open go within seconds: the handshake limit (3 s) for the
    # zmq ports, the header timeout for HTTP. Counted on the node's side: a connection that the
    # closed door (gate.py) left half-open in the kernel's SYN queue holds nothing of the node's.
    ports = (victim.port, victim.port + 1, http_port)
    try:  # the attacker's sockets stay open meanwhile: only the node may end them
        wait_for(lambda: established(ports) <= 8, 15, what="the node to drop the idle connections")
    except AssertionError as e:
        raise AssertionError(f"{e}: {established(ports)} still established") from None
    finally:
        attacker.close()
    fds = open_fds(victim.proc.pid)
    print(f"fds {fds} after")
    assert fds <= baseline + 16, os.listdir(f"/proc/{victim.proc.pid}/fd")
    assert victim.running()
    assert "peer" in victim.alive_peer_names() and victim.node_id() in {p["id"] for p in peer.peers()}
    stats = victim.admin("status")["counters"]
    assert stats.get("gate_refused_gossip", 0) > 0 and stats.get("gate_refused_gateway", 0) > 0, stats


def test_idle_connection_flood_on_a_worker(cluster):
    victim = cluster.node("victim", role="worker", port=free_port(2),
                          prefix=["prlimit", f"--nofile={LIMIT}:{LIMIT}", "--"])
    peer = cluster.node("peer", role="worker", bootstrap=[victim])
    wait_for(lambda: "peer" in victim.alive_peer_names(), 30, what="the victim to hear its peer")
    me = wait_for(lambda: next((p for p in peer.peers() if p["name"] == "victim" and "tunnel" in p["endpoints"]),
                               None), 30, what="the victim's tunnel exit")
    tunnel_port = int(me["endpoints"]["tunnel"].rsplit(":", 1)[1])
    baseline = open_fds(victim.proc.pid)
    attacker = Attacker([victim.port, tunnel_port])
    attacker.start()
    try:
        end = time.monotonic() + ATTACK_S / 2
        while time.monotonic() < end:
            assert victim.running(), victim.log()[-3000:]
            assert "peer" in victim.alive_peer_names()
            time.sleep(0.3)
    finally:
        attacker.stop.set()
        attacker.join(5)
    try:
        wait_for(lambda: established((victim.port, tunnel_port)) <= 4, 15, what="the node to drop the idle connections")
    finally:
        attacker.close()
    assert open_fds(victim.proc.pid) <= baseline + 16
    stats = victim.admin("status")["counters"]
    assert stats.get("gate_refused_tunnel", 0) > 0 and stats.get("gate_refused_gossip", 0) > 0, stats
