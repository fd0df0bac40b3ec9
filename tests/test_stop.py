"""SIGTERM stops a node within STOP_BOUND_S, whatever the node is doing (real node processes).

- its mDNS is busy: a stranger on the test network announces services that never resolve, so the
  node's mDNS thread sits in zeroconf resolves (3 s each, a queue of them) when SIGTERM comes;
- it is still starting: an actor is stuck in a blocking call (the Ledger reads its peers file, and
  that file is a FIFO nobody writes, as on a hung file system), so start-up waits on it;
- and a start that times out on such an actor ends the process at once, with one line of error.

mDNS runs only inside the test's network namespaces, bound to their addresses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cluster import child_state, wait_for
from netns import NetnsLab, netns_available
from zswarm.node import START_TIMEOUT_S

pytestmark = pytest.mark.slow

STOP_BOUND_S = 2.0  # SIGTERM to exit

# A stranger on the LAN: answers with PTR records of GHOSTS services and nothing else, so every
# resolve of them waits for its timeout; prints RESOLVING once a node queries one of them.
GHOSTS = 20
GHOST_ANNOUNCER = r"""
import socket, sys, time
from zeroconf import DNSIncoming, DNSOutgoing, DNSPointer
from zeroconf.const import _CLASS_IN, _FLAGS_AA, _FLAGS_QR_RESPONSE, _TYPE_PTR

addr, n = sys.argv[1], int(sys.argv[2])
kind = "_zswarm._tcp.local."
ghosts = {f"ghost{i}.{kind}" for i in range(n)}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5353))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton("224.0.0.251") + socket.inet_aton(addr))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
s.settimeout(0.2)
out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
for g in sorted(ghosts):
    out.add_answer_at_time(DNSPointer(kind, _TYPE_PTR, _CLASS_IN, 4500, g), 0)
packets, seen, next_send = out.packets(), set(), 0.0
while True:
    if time.monotonic() >= next_send:
        for p in packets:
            s.sendto(p, ("224.0.0.251", 5353))
        next_send = time.monotonic() + 1.0
    try:
        data, _ = s.recvfrom(9000)
    except socket.timeout:
        continue
    for q in DNSIncoming(data).questions:
        if q.name in ghosts and q.name not in seen:
            seen.add(q.name)
            print("RESOLVING", q.name, flush=True)
"""


def sigterm_and_time(node) -> tuple[int, float]:
    """SIGTERM ``node``; (exit status, seconds until it exited). Fails if it has not exited in 15 s."""
    t0 = time.monotonic()
    node.signal(signal.SIGTERM)
    try:
        rc = node.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{node.name} did not stop within 15 s of SIGTERM:\n{node.log()[-4000:]}")
    return rc, time.monotonic() - t0


def blocked_peers_file(state_dir) -> tuple[os.PathLike, callable]:
    """Make the node's peers file a FIFO; returns it and a poll that opens its writing end once the
    Ledger is blocked reading it (and then keeps it open without writing, so the read blocks)."""
    state_dir.mkdir(mode=0o700)
    fifo = state_dir / "peers.json"
    os.mkfifo(fifo)

    def writer() -> int:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO (an OSError) until a reader is there
    return fifo, writer


@pytest.mark.netns
def test_sigterm_stops_a_node_within_2_s_while_its_mdns_is_busy_resolving(cluster, tmp_path):
    reason = netns_available()
    if reason:
        pytest.fail(f"network namespaces are needed for this test: {reason}")
    with NetnsLab(2) as lab:
        h0, h1 = lab.hosts
        ghost_log = tmp_path / "ghosts.log"
        with open(ghost_log, "wb") as out:
            h0.popen([sys.executable, "-c", GHOST_ANNOUNCER, h0.addr, str(GHOSTS)], stdout=out,
                     stderr=subprocess.STDOUT)
        w = cluster.node("w", "worker", host=h1.addr, prefix=h1.exec_prefix, mdns=True,
                         extra=["--mdns-interface", h1.addr])
        wait_for(lambda: " up: " in w.log(), 30, what="w to start")
        # zeroconf's registration probes first (about 2 s), then the browser sees the ghosts
        wait_for(lambda: "RESOLVING" in ghost_log.read_text(), 30, what="w's mDNS to try to resolve a ghost")
        resolving = ghost_log.read_text().count("RESOLVING")
        assert resolving < GHOSTS, "every ghost resolve was tried already: mDNS is not busy any more"
        rc, took = sigterm_and_time(w)
        assert rc == 0, w.log()[-4000:]
        assert took < STOP_BOUND_S, f"w took {took:.2f} s to stop:\n{w.log()[-4000:]}"
        assert "Traceback" not in w.log() and "bug:" not in w.log(), w.log()[-4000:]


def test_sigterm_stops_a_node_within_2_s_while_it_is_still_starting(cluster, tmp_path):
    _, writer = blocked_peers_file(tmp_path / "w")
    w = cluster.node("w", "worker", state_dir=tmp_path / "w")  # mDNS off, on 127.0.0.1
    fd = wait_for(writer, 30, what="w's Ledger to block reading its peers file")
    try:
        assert w.running()  # the Ledger is inside open() now, so start-up is waiting on it and " up: " not in w.log()
        rc, took = sigterm_and_time(w)
    finally:
        os.close(fd)
    assert rc == 0, w.log()[-4000:]
    assert took < STOP_BOUND_S, f"w took {took:.2f} s to stop:\n{w.log()[-4000:]}"
    assert "received SIGTERM while starting" in w.log(), w.log()[-4000:]


def test_a_node_whose_start_times_out_exits_at_once_with_one_line_of_error(cluster, tmp_path):
    _, writer = blocked_peers_file(tmp_path / "w")
    w = cluster.node("w", "worker", state_dir=tmp_path / "w")
    fd = wait_for(writer, 30, what="w's Ledger to block reading its peers file")
    t0 = time.monotonic()  # start-up's wait on the Ledger began just before
    try:
        rc = w.wait(START_TIMEOUT_S + 15)
        took = time.monotonic() - t0
    except subprocess.TimeoutExpired:
        pytest.fail(f"w did not exit after its start timed out:\n{w.log()[-4000:]}")
    finally:
        os.close(fd)
    log = w.log()
    errors = [line for line in log.splitlines() if line.startswith("zswarm: error:")]
    assert rc == 1, log[-4000:]
    assert errors == [f"zswarm: error: the node did not start in time (no answer to _start_all: "
                      f"ledger.proxy().open() within {START_TIMEOUT_S:g} s)"], log[-4000:]
    assert took < START_TIMEOUT_S + STOP_BOUND_S, f"w exited {took:.2f} s after start-up began waiting:\n{log[-4000:]}"


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for tid in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = {int(k) for k in f.read().split()}
            except OSError:
                continue
            todo += list(kids - out)
            out |= kids
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_sigkilled_node_takes_its_children_with_it(cluster):
    """Each child asks for its parent-death signal itself (the node spawns without preexec_fn):
    the engine, gunicorn's master and its workers all end when the node is SIGKILLed."""
    node = cluster.node("s", "server", extra=["--threads", "1"])
    wait_for(lambda: child_state(node.admin("status"), "engine") == "ready", 60,
             what="the engine to be ready")
    kids = _descendants(node.proc.pid)
    assert len(kids) >= 3, kids  # engine, gunicorn master, a gunicorn worker
    node.signal(signal.SIGKILL)
    node.wait(5)
    wait_for(lambda: not any(_alive(k) for k in kids), 10, what=f"the children {sorted(kids)} to end")
