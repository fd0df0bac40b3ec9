"""Acceptance tests of the node spine with real node processes on 127.0.0.1."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from cluster import REPO, wait_for

pytestmark = pytest.mark.slow


def all_see_each_other(nodes):
    names = {n.name for n in nodes}
    return all(n.alive_peer_names() == names - {n.name} for n in nodes)


def refused(node):
    counters = node.admin("status")["counters"]
    return counters.get("auth_denied", 0) + counters.get("handshake_failed", 0)


def test_chain_of_three_converges(cluster):
    a = cluster.node("a", "server")
    b = cluster.node("b", "worker", bootstrap=[a])
    c = cluster.node("c", "federated", bootstrap=[b])
    for n in (a, b, c):
        n.node_id()  # up and answering
    wait_for(lambda: all_see_each_other([a, b, c]), 5, what="the chain to converge")
    peers = {p["name"]: p for p in a.admin("peers")}
    assert peers["b"]["role"] == "worker" and peers["c"]["role"] == "federated"
    assert set(peers["c"]) >= {"id", "name", "role", "state"}


def test_other_token_is_invisible(cluster, tmp_path):
    from zswarm.token import Token

    a = cluster.node("a")
    b = cluster.node("b", bootstrap=[a])
    stranger = cluster.node("stranger", bootstrap=[a, b], token=Token.generate().encode())
    a.node_id(), b.node_id(), stranger.node_id()
    wait_for(lambda: all_see_each_other([a, b]), 5, what="a and b")
    # the stranger dials both, over and over; give it a few rounds of heartbeats
    wait_for(lambda: refused(a) >= 2, 10,
             what="a to refuse the stranger's handshakes")
    assert "stranger" not in a.alive_peer_names() | b.alive_peer_names()
    assert stranger.peers() == []
    assert {p["name"] for p in a.peers()} == {"b"}


def test_plain_zmq_socket_receives_nothing(cluster):
    import zmq

    a = cluster.node("a")
    b = cluster.node("b", bootstrap=[a])
    wait_for(lambda: all_see_each_other([a, b]), 10, what="a and b")
    ctx = zmq.Context()
    try:
        socks = []
        for kind in (zmq.SUB, zmq.PUB, zmq.DEALER):
            s = ctx.socket(kind)
            s.linger = 0
            if kind == zmq.SUB:
                s.subscribe(b"")
            s.connect(f"tcp://{a.endpoint}")
            socks.append(s)
        # a plain PUB also *binds* where a node might dial it: nothing dials strangers, but check a SUB
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        for s in socks[1:]:
            try:
                s.send(b"hello", zmq.NOBLOCK)
            except zmq.Again:
                pass
        assert poller.poll(2000) == []
    finally:
        ctx.destroy(linger=0)
    assert a.running() and "b" in a.alive_peer_names()


def test_sigkill_marks_dead_and_sigterm_drops(cluster):
    a = cluster.node("a")
    b = cluster.node("b", bootstrap=[a])
    c = cluster.node("c", bootstrap=[b])
    wait_for(lambda: all_see_each_other([a, b, c]), 10, what="three nodes")
    c.signal(signal.SIGKILL)
    c.wait(5)
    wait_for(lambda: all(any(p["name"] == "c" and p["state"] == "dead" for p in n.peers()) for n in (a, b)),
             10, what="c to be marked dead")
    b.signal(signal.SIGTERM)
    wait_for(lambda: "b" not in {p["name"] for p in a.peers()}, 2, what="b to be dropped after its leave")
    assert b.wait(5) == 0


def test_restarted_node_keeps_its_id(cluster):
    a = cluster.node("a")
    b = cluster.node("b", bootstrap=[a])
    b_id = b.node_id()
    wait_for(lambda: all_see_each_other([a, b]), 10, what="a and b")
    b.signal(signal.SIGTERM)
    assert b.wait(10) == 0
    wait_for(lambda: a.peers() == [], 3, what="a to drop b")
    b.start()
    assert b.node_id() == b_id
    wait_for(lambda: [p["id"] for p in a.peers() if p["state"] == "alive"] == [b_id], 5,
             what="a to see b again under the same id")


def test_restarted_node_that_knew_nobody_finds_its_peers_again(cluster):
    # a knows nobody; c learned a only through b; b then leaves for good, so after a's restart
    # nobody dials a: a must dial its remembered peers itself
    a = cluster.node("a")
    b = cluster.node("b", bootstrap=[a])
    c = cluster.node("c", bootstrap=[b])
    wait_for(lambda: all_see_each_other([a, b, c]), 10, what="three nodes")
    wait_for(lambda: (a.state_dir / "peers.json").exists(), 10, what="a to remember its peers")
    b.signal(signal.SIGTERM)
    assert b.wait(10) == 0
    a.signal(signal.SIGTERM)
    assert a.wait(10) == 0
    wait_for(lambda: c.peers() == [], 5, what="c to drop a and b")
    a.start()
    wait_for(lambda: a.alive_peer_names() == {"c"} and c.alive_peer_names() == {"a"}, 5,
             what="a and c to find each other again")


def test_admin_socket(cluster):
    a = cluster.node("a")
    a.node_id()
    sock = a.state_dir / "admin.sock"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(a.state_dir).st_mode) == 0o700
    run = lambda *args: subprocess.run([sys.executable, "-m", "zswarm", "admin", "--state-dir", str(a.state_dir), *args],
                                       capture_output=True, text=True, cwd=REPO, timeout=30)
    out = run("peers", "--json")
    assert out.returncode == 0 and out.stdout.strip() == "[]"
    bad = run("frobnicate")
    assert bad.returncode == 1 and "error 1" in bad.stderr and "Traceback" not in bad.stderr
    status = run("status", "--json")
    assert "\"role\": \"worker\"" in status.stdout


def test_admin_waits_for_a_node_that_is_starting(cluster):
    """What the README does right after starting a node: without --wait the admin loses the race."""
    state = cluster.tmp / "late"
    waiting = subprocess.Popen([sys.executable, "-m", "zswarm", "admin", "--state-dir", str(state), "--wait", "30",
                                "status", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    time.sleep(1.0)  # the admin is waiting before the node even starts
    cluster.node("late", state_dir=state)
    out, err = waiting.communicate(timeout=40)
    assert waiting.returncode == 0, err
    assert json.loads(out)["name"] == "late"
    gone = run_cli("admin", "--state-dir", str(cluster.tmp / "nobody"), "--wait", "1", "status")
    assert gone.returncode == 1 and "no node is running" in gone.stderr and "Traceback" not in gone.stderr


def test_nodes_sharing_a_host_get_names_apart(cluster, token):
    """Without --name a node is called after its host and its id, so two on one host differ."""
    import socket

    from cluster import free_port
    from zswarm.admin_client import call

    procs, names = [], []
    try:
        for i in range(2):
            state = cluster.tmp / f"unnamed{i}"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "zswarm", "worker", "--no-mdns", "--state-dir", str(state),
                 "--p2p-listen", f"127.0.0.1:{free_port(2)}"], cwd=REPO, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO), "ZSWARM_TOKEN": token}))
            status = wait_for(lambda: call(str(state), "status", timeout_s=3.0), 20, what="the unnamed node")
            names.append((status["name"], status["id"]))
    finally:
        for p in procs:
            p.terminate()
            p.wait(15)
    assert [n for n, _ in names] == [f"{socket.gethostname()}-{i[:4]}" for _, i in names]
    assert names[0][0] != names[1][0]


def run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "zswarm", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("args", [
    ["worker", "--no-mdns"],
    ["worker", "--no-mdns", "--token", "zs1AAAA"],
    ["server", "--no-mdns", "--token", "hello"],
    ["server", "--no-mdns", "--p2p-listen", "nonsense"],
    ["token", "inspect", "zs1" + "A" * 60],
])
def test_bad_input_is_one_line(args, tmp_path):
    out = run_cli(*args, "--state-dir", str(tmp_path)) if args[0] != "token" else run_cli(*args)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("zswarm: error:")


def test_port_in_use_is_one_line(cluster, tmp_path):
    a = cluster.node("a")
    a.node_id()
    out = run_cli("server", "--no-mdns", "--token", cluster.token, "--state-dir", str(tmp_path / "x"),
                  "--p2p-listen", a.endpoint)
    assert out.returncode == 1 and "cannot listen" in out.stderr and "Traceback" not in out.stderr
