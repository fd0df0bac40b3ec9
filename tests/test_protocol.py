"""A node of another gossip protocol is refused with one clear line on both sides (issue 13,
outcome 6). The other side here is the test itself: a CURVE SUB that holds the token, like an
old node's gossip port, and a PUB that sends it a Beat in protocol 2's envelope."""

import time

import msgspec
import zmq

from cluster import free_port, wait_for
from forger import Forger
from zswarm import wire
from zswarm.token import Token


def test_a_node_of_another_protocol_is_refused_and_dialed_back(cluster, token):
    n = cluster.node("n", "worker")
    n.node_id()
    keys = Token.parse(token).derive()
    ctx = zmq.Context()
    old = ctx.socket(zmq.SUB)  # the old node's gossip port (no ZAP handler here: it takes anyone)
    old.linger = 0
    old.curve_server = True
    old.curve_publickey, old.curve_secretkey = keys.curve_public, keys.curve_secret
    old.subscribe(b"")
    port = free_port()
    old.bind(f"tcp://127.0.0.1:{port}")
    try:
        with Forger(token, [f"tcp://{n.endpoint}"], ctx=ctx) as f:
            f.open()
            beat = {"type": 1, "id": "0ld0ld0ld0ld0ld0", "incarnation": 1, "version": 0, "heartbeat": 1,
                    "gossip": f"tcp://127.0.0.1:{port}", "sig": b""}
            envelope = msgspec.msgpack.encode([2, keys.network_id, "0ld0ld0ld0ld0ld0",
                                               msgspec.Raw(msgspec.msgpack.encode(beat))])
            deadline = time.monotonic() + 10
            got = None
            while got is None and time.monotonic() < deadline:
                f._pub.send_multipart([wire.TOPIC_ALL, envelope])
                if old.poll(500):
                    got = old.recv_multipart()
            assert got is not None, "the node did not dial the old node back"
            proto = msgspec.msgpack.decode(got[1])[0]
            assert proto == wire.PROTOCOL  # what the old node refuses, and logs, in turn
        wait_for(lambda: "refused gossip from node '0ld0ld0ld0ld0ld0': protocol 2" in n.log(), 5,
                 what="the node's one line about the old node")
        assert n.log().count("refused gossip from node '0ld0ld0ld0ld0ld0'") == 1
        assert "0ld0ld0ld0ld0ld0" not in {p["id"] for p in n.peers()}
    finally:
        old.close(0)
        ctx.term()
