"""Hostile input on every listening socket: the node stays up and keeps its peers."""

import os
import random
import socket
import time

import msgspec
import pytest
import zmq

from cluster import wait_for
from zswarm import wire
from zswarm.token import Token
from zswarm.transport import curve_client

pytestmark = pytest.mark.slow

ZMTP_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def raw_tcp_garbage(host, port, rng, until):
    n = 0
    while time.monotonic() < until:
        payload = rng.choice([
            os.urandom(rng.randint(1, 4096)),
            ZMTP_GREETING[: rng.randint(1, len(ZMTP_GREETING))],
            ZMTP_GREETING + os.urandom(rng.randint(1, 512)),
            b"\x04\x19\x05HELLO" + os.urandom(200),
        ])
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.sendall(payload)
                s.settimeout(0.05)
                try:
                    s.recv(4096)
                except (socket.timeout, OSError):
                    pass
            n += 1
        except OSError:
            pass
    return n


def hostile_frames(net, rng):
    good = wire.encode(net, "f" * 16, wire.Beat("f" * 16, 1, 0, 1, "tcp://127.0.0.1:1"))
    return rng.choice([
        [b"*", os.urandom(rng.randint(0, 300))],
        [b"*", good[: rng.randint(0, len(good) - 1)]],
        [b"*", good, b"extra"],
        [b"*"],
        [b"*", msgspec.msgpack.encode([99, net, "x", b"\x00"])],  # a future protocol
        [b"*", msgspec.msgpack.encode([wire.PROTOCOL, net, "x", msgspec.msgpack.encode({"type": 77})])],
        [b"*", wire.encode("0" * 16, "x" * 16, wire.Leave("x" * 16, 1))],  # another network id
        [b"*", wire.encode(net, "e" * 16, wire.Beat("a" * 16, 1, 0, 1, "tcp://127.0.0.1:1"))],  # forged id
        [b"*", msgspec.msgpack.encode([wire.PROTOCOL, net, "x", msgspec.msgpack.encode([[[[[[]]]]]] * 1000)])],
    ])


def test_hostile_frames_everywhere(cluster, token):
    a = cluster.node("a")
    b = cluster.node("b", bootstrap=[a])
    wait_for(lambda: "b" in a.alive_peer_names() and "a" in b.alive_peer_names(), 10, what="a and b")
    keys = Token.parse(token).derive()
    rng = random.Random(1234)
    ctx = zmq.Context()
    try:
        # an insider: holds the token, so its frames get past CURVE and reach the decoder
        insider = curve_client(ctx.socket(zmq.PUB), keys)
        insider.linger = 0
        insider.connect(f"tcp://{a.endpoint}")
        # the admin socket, spoken to by a local process with junk
        admin = ctx.socket(zmq.DEALER)
        admin.linger = 0
        admin.connect(f"ipc://{a.state_dir / 'admin.sock'}")
        until = time.monotonic() + 4
        sent = 0
        while time.monotonic() < until:
            insider.send_multipart(hostile_frames(keys.network_id, rng))
            admin.send_multipart(rng.choice([[os.urandom(50)], [b"{}"], [b'{"command": 5}'], [b"a", b"b", b"c"],
                                             [b'{"command": "status", "args": {"x": 1}}'], [b"[" * 10000]]))
            sent += 1
            if sent % 50 == 0:
                time.sleep(0.01)
        n_raw = raw_tcp_garbage("127.0.0.1", a.port, rng, time.monotonic() + 3)
        with socket.socket(socket.AF_UNIX) as u:
            u.connect(str(a.state_dir / "admin.sock"))
            u.sendall(os.urandom(2000))
    finally:
        ctx.destroy(linger=0)
    assert n_raw > 10 and sent > 100
    assert a.running() and b.running()
    status = a.admin("status")
    assert status["counters"].get("gossip_bad_frames", 0) > 0
    wait_for(lambda: a.alive_peer_names() == {"b"} and b.alive_peer_names() == {"a"}, 5,
             what="peers still listed after the storm")
    assert "Traceback" not in a.log()
