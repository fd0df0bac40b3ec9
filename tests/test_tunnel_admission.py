"""A worker's tunnel exit opens streams for the server whose split it serves, and nobody else
(issue 13): a member that holds the token, is in every ledger, and dials the worker's exit with
the worker's own key cannot reach the worker's RPC server."""

from __future__ import annotations

import signal
import socket
import time

import openai
import pytest
import zmq

from cluster import child_state, wait_for
from forger import Forger
from zswarm.token import Token
from zswarm.transport import Stats
from zswarm.tunnel import TunnelEntry

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


def test_only_the_planning_server_opens_streams_through_a_workers_exit(cluster, token):
    w = cluster.node("w", "worker", extra=["--mem", "1GiB", "--threads", "1"])
    s = cluster.node("s", "server", bootstrap=[w], extra=["--p2p", "--no-local-layers", "--threads", "1"])

    def split() -> bool:
        st = s.admin("status")
        shard = st.get("shard") or {}
        return child_state(st, "engine") == "ready" and bool(shard.get("workers")) \
            and not shard.get("pending") and not shard.get("settling")
    wait_for(split, 120, 0.2, what="the server split over the worker")
    api = openai.OpenAI(base_url=f"http://{s.args[s.args.index('--address') + 1]}/v1", api_key="x", max_retries=0)
    assert api.chat.completions.create(model=MODEL, max_tokens=2,
                                       messages=[{"role": "user", "content": "Hi"}]).choices
    me = next(p for p in s.peers() if p["name"] == "w")

    # A member: its signed record is in the worker's ledger, so ZAP lets its key in.
    with Forger(token, [f"tcp://{w.endpoint}"]) as member:
        member.open()
        member.barrage(member.announce(), rounds=3, over_s=0.6)
        wait_for(lambda: member.node_id in {p["id"] for p in w.peers()}, 10, what="the worker to list the member")
        ctx = zmq.Context()
        entry = TunnelEntry(ctx, Token.parse(token).derive(), me["endpoints"]["tunnel"], Stats(),
                            own=(member.ident.curve_public, member.ident.curve_secret),
                            server_key=me["curve"].encode())
        entry.start()
        try:
            assert entry.wait_connected(10), "the member's handshake with the exit failed"
            before = w.admin("status")["counters"].get("tunnel_exit_refused", 0)
            with socket.create_connection(("127.0.0.1", entry.local_port), timeout=10) as c:
                c.sendall(b"\x00" * 9)  # the start of an RPC HELLO
                try:
                    got = c.recv(64)  # refused: the exit sends CLOSE, the entry ends the connection
                except ConnectionResetError:
                    got = b""
                except TimeoutError:  # the stream is open: llama.cpp's server waits for the rest
                    got = b"(held open)"
            assert got == b"", f"the worker's RPC server answered a member that is not its server: {got!r}"
            wait_for(lambda: w.admin("status")["counters"].get("tunnel_exit_refused", 0) > before, 5,
                     what="the exit to count the refusal")
        finally:
            entry.stop()
            ctx.term()
    time.sleep(0.5)
    assert api.chat.completions.create(model=MODEL, max_tokens=2,  # the server's own streams go on
                                       messages=[{"role": "user", "content": "Hi"}]).choices

    # A worker restarted while its server runs hears the server's claim before its exit exists;
    # the exit must still admit the server (the Ansible rolling restart found it refusing).
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0
    w.start()
    wait_for(lambda: w.admin("status")["children"].get("rpc", {}).get("state") == "ready", 60, 0.2,
             what="the worker back")
    wait_for(split, 120, 0.2, what="the split over the restarted worker")
    answer = wait_for(lambda: api.chat.completions.create(model=MODEL, max_tokens=2,
                                                          messages=[{"role": "user", "content": "Hi"}]).choices,
                      60, 0.5, what="an answer through the restarted worker",
                      retry=(openai.APIStatusError, openai.APIConnectionError))
    assert answer
    assert w.admin("status")["counters"].get("tunnel_exit_refused", 0) == 0  # a fresh process: none refused
