"""What happens to requests when nodes die, stall or vanish: real nodes, the real model.

- a non-streamed request is retried on another node even after chunks were generated, because
  the client has received nothing until Done;
- a request's timeout (X-Zswarm-Timeout) ends it with 504, and the node that was too slow is
  cooled down;
- a model that was served a moment ago and has no route now is 503 with Retry-After (retried by
  OpenAI clients), not 404;
- a gateway with 1,000 routes still routes (one socket for every peer link, not two per route).
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import time
import urllib.error
import urllib.request
import uuid

import openai
import pytest
import zmq

from cluster import Cluster, wait_for
from forger import Forger
from test_federated import MODEL, SERVER_ARGS, api_url, client, routes_ready, start_federation
from zswarm import wire
from zswarm.actors.gateway import GatewayActor
from zswarm.balancing import Route, RouteTable
from zswarm.token import Token
from zswarm.transport import Stats

pytestmark = pytest.mark.slow


def post(node, body: dict, headers: dict | None = None, timeout_s: float = 60):
    """(status, headers (case-insensitive), JSON body) of one chat completion."""
    req = urllib.request.Request(api_url(node) + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def chat(content: str, max_tokens: int) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}


def server_behind_an_entry(c: Cluster):
    """A federated server ``s`` and a model-less entry point ``f`` that routes to it."""
    s = c.node("s", "server", extra=SERVER_ARGS)
    f = c.node("f", "federated", bootstrap=[s])
    wait_for(lambda: routes_ready(f, 1), 60, 0.2, what="the server routable")
    return s, f


def test_whole_answers_survive_a_server_killed_mid_generation(tmp_path):
    c, s1, s2, f = start_federation(tmp_path)
    try:
        wait_for(lambda: routes_ready(f), 60, 0.2, what="both servers routable")
        api = client(f)

        def one(i):
            try:
                out = api.chat.completions.create(model=MODEL, max_tokens=48, messages=[
                    {"role": "user", "content": f"Tell me a story about the number {i}."}])
                return ("ok", out.choices[0].message.content)
            except openai.APIError as e:
                return ("lost", repr(e))

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, i) for i in range(16)]
            # both servers generating: s1 dies with answers half made, which nobody has seen yet
            wait_for(lambda: all(s.admin("status")["gateway"]["in_flight"] > 0 for s in (s1, s2)), 30, 0.05,
                     what="load on both servers")
            s1.signal(signal.SIGKILL)
            results = [fu.result(timeout=300) for fu in futures]
        lost = [r for r in results if r[0] != "ok"]
        assert not lost, lost
        assert all(text for _, text in results)
        assert f.admin("status")["counters"].get("requests_retried", 0) >= 1
    finally:
        c.close()


def test_timeout_header_gives_504_and_cools_the_slow_node(tmp_path):
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        s, f = server_behind_an_entry(c)
        status, headers, body = post(f, chat("hi", 4), {"X-Zswarm-Timeout": "soon"})
        assert status == 400 and body["error"]["param"] == "X-Zswarm-Timeout", body
        t0 = time.monotonic()
        status, headers, body = post(f, chat("Write a very long essay about the sea.", 1500),
                                     {"X-Zswarm-Timeout": "0.5"})
        took = time.monotonic() - t0
        assert status == 504 and body["error"]["code"] == "timeout", body
        # (the engine, the server's gateway or the entry's: whichever clock ran out first said so)
        assert took < 30  # a bound against hanging, not a speed figure
        sid = s.node_id()
        assert f.admin("status")["gateway"]["cooling"] == [sid]
        # the server stopped working on it: its engine is free again
        wait_for(lambda: s.admin("status")["gateway"]["in_flight"] == 0, 15, 0.1, what="the server to let go")
        status, _, body = post(f, chat("Say hi.", 4))
        assert status == 200, body  # the only node: cooling never means "no node at all"
    finally:
        c.close()


def test_a_model_served_a_moment_ago_is_503_with_retry_after_not_404(tmp_path):
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        s, f = server_behind_an_entry(c)
        s.signal(signal.SIGTERM)  # leaves the cluster: its route goes at once
        s.wait(15)
        wait_for(lambda: not f.admin("status")["gateway"]["routes"], 15, 0.1, what="the route to go")
        status, headers, body = post(f, chat("hi", 4))
        assert status == 503 and body["error"]["code"] == "no_node", body
        assert headers.get("Retry-After") == "1"
        status, _, body = post(f, {**chat("hi", 4), "model": "never-served"})
        assert status == 404 and body["error"]["code"] == "model_not_found"
    finally:
        c.close()


def test_a_gateway_with_a_thousand_routes_still_routes(tmp_path):
    """999 routes to members that accept TCP and never speak, and one to a real server."""
    token = Token.generate()
    c = Cluster(tmp_path, token.encode())
    listeners: list[socket.socket] = []
    gateway = member = None
    ctx = zmq.Context()
    try:
        s = c.node("s", "server", extra=SERVER_ARGS)
        wait_for(lambda: s.admin("status")["gateway"]["routes"], 60, 0.2, what="the server's engine")
        status = s.admin("status")
        # the entry is a member (its signed record in the server's ledger), and it knows the
        # server's own key: only then does the server's gateway let it in (issue 13)
        member = Forger(token.encode(), [f"tcp://{s.endpoint}"]).open()
        member.barrage(member.announce(), rounds=3, over_s=0.6)
        wait_for(lambda: member.node_id in {p["id"] for p in s.peers()}, 10, what="the server to list the entry")
        curve = s.admin("ledger")[0]["curve"]
        real = Route(status["id"], status["endpoints"]["gateway"], (MODEL,), "s", curve=curve)
        routes = []
        for i in range(999):
            ls = socket.socket()
            ls.bind(("127.0.0.1", 0))
            ls.listen(1)
            listeners.append(ls)
            routes.append(Route(f"phantom-{i}", f"tcp://127.0.0.1:{ls.getsockname()[1]}", ("phantom",), f"p{i}"))
        routes.append(real)  # last: a socket per route would have run out long before it
        endpoint = f"ipc://{tmp_path}/gw.sock"
        gateway = GatewayActor.start(ctx, "entry", endpoint, Stats(), token.derive(),
                                     own=(member.ident.curve_public, member.ident.curve_secret))
        gateway.proxy().open().get(timeout=10)
        gateway.proxy().set_routes(RouteTable(tuple(routes))).get(timeout=10)
        assert gateway.proxy().status().get(timeout=10)["links"]["wanted"] == 1000
        # the phantoms never finish a handshake; the real server does
        wait_for(lambda: gateway.proxy().status().get(timeout=10)["links"]["up"] == 1, 30, 0.1,
                 what="the link to the real server")

        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(endpoint)
        rid = uuid.uuid4().hex
        dealer.send(wire.encode_inference("test", wire.GenRequest(
            id=rid, kind="completion", model=MODEL, prompt="The sea is", max_tokens=8, timeout_s=60)))
        bodies = []
        while not bodies or not isinstance(bodies[-1], (wire.Done, wire.Fail)):
            assert dealer.poll(90_000), f"no answer; got {bodies}"
            bodies.append(wire.decode_inference(dealer.recv()).body)
        assert isinstance(bodies[-1], wire.Done), bodies
        assert bodies[-1].node == real.node and "".join(b.text for b in bodies[:-1])
        dealer.close()
    finally:
        if gateway is not None:
            gateway.stop(timeout=10)
        ctx.destroy(linger=0)
        for ls in listeners:
            ls.close()
        if member is not None:
            member.close()
        c.close()
