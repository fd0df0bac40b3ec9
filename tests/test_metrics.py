"""/metrics: Prometheus text that prometheus_client's own parser reads, and counters that move
when requests are served. Scripted backend and cluster first; then, marked slow, real nodes."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import falcon.testing
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster, wait_for
from swarm_fakes import MODEL, FakeBackend, FakeCluster, peer
from zswarm import wire
from zswarm.http import create_app
from zswarm.token import Token

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, for every sample of every family."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: dict, metric: str, /, **labels: str) -> float:
    return got.get((metric, tuple(sorted(labels.items()))), 0.0)


def scrape(c: falcon.testing.TestClient) -> dict:
    r = c.simulate_get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


def test_counters_move_when_requests_are_served():
    fake = FakeCluster([peer(1, "server", flags=["federated"]), peer(2, "worker", state="suspect"),
                        peer(3, "worker", state="dead")])
    c = falcon.testing.TestClient(create_app(FakeBackend(node="n1"), node_name="entry", cluster=fake))
    before = scrape(c)
    assert value(before, "zswarm_http_requests_total", node="n1", model=MODEL, status="200") == 0
    assert c.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200
    assert c.simulate_post("/v1/completions", json={"model": MODEL, "prompt": "a", "stream": True}).status_code == 200
    assert c.simulate_post("/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
    assert c.simulate_post("/v1/chat/completions", body=b"{").status_code == 400
    got = scrape(c)
    assert value(got, "zswarm_http_requests_total", node="n1", model=MODEL, status="200") == 2
    assert value(got, "zswarm_http_requests_total", node="", model="", status="404") == 1  # no client-chosen label
    assert value(got, "zswarm_http_requests_total", node="", model="", status="400") == 1
    assert value(got, "zswarm_tokens_generated_total", node="n1", model=MODEL) == 4
    assert value(got, "zswarm_prompt_tokens_total", node="n1", model=MODEL) == 10
    assert value(got, "zswarm_time_to_first_token_seconds_count", model=MODEL) == 2
    assert value(got, "zswarm_request_duration_seconds_count", model=MODEL) == 2
    assert value(got, "zswarm_time_to_first_token_seconds_bucket", model=MODEL, le="+Inf") == 2
    assert value(got, "zswarm_http_in_flight") == 0
    # the node's own figures, read from its admin socket at scrape time
    assert value(got, "zswarm_node_up") == 1
    assert value(got, "zswarm_peers", state="alive") == 1
    assert value(got, "zswarm_peers", state="suspect") == 1
    assert value(got, "zswarm_peers", state="dead") == 1
    assert value(got, "zswarm_gossip_messages_total", direction="in") == 120
    assert value(got, "zswarm_gossip_bytes_total", direction="out") == 8800
    assert value(got, "zswarm_tunnel_bytes_total", direction="in") == 0  # present before worker mode fills it
    assert value(got, "zswarm_child_restarts_total", child="engine") == 2
    assert value(got, "zswarm_child_restarts_total", child="http") == 0
    assert value(got, "zswarm_reshards_total") == 1
    assert value(got, "zswarm_gateway_requests_total", outcome="failed") == 1
    assert value(got, "zswarm_node_events_total", event="auth_denied") == 3
    assert value(got, "zswarm_gateway_in_flight") == 1
    assert value(got, "zswarm_node_info", id=fake.self_id, name="entry", role="server", network_id="0123abcd") == 1
    fake.counters["gossip_in"] = 500
    fake.served = {fake.self_id: 9}
    got = scrape(c)
    assert value(got, "zswarm_gossip_messages_total", direction="in") == 500
    assert value(got, "zswarm_routed_requests_total", node=fake.self_id, name="entry") == 9


def test_stream_cut_by_the_client_counts_as_499():
    class Endless(FakeBackend):
        def generate(self, req):
            while True:
                yield wire.Chunk(req.id, "x")

    app = create_app(Endless(), cluster=FakeCluster())
    env = falcon.testing.create_environ("/v1/chat/completions", method="POST",
                                        body=json.dumps({**CHAT, "stream": True}),
                                        headers={"Content-Type": "application/json"})
    started = {}
    body = app(env, lambda status, headers: started.update(status=status))
    assert started["status"].startswith("200")
    it = iter(body)
    next(it), next(it)
    body.close()  # what the WSGI server does when a write to the client fails
    got = scrape(falcon.testing.TestClient(app))
    assert value(got, "zswarm_http_requests_total", node="", model=MODEL, status="499") == 1
    assert value(got, "zswarm_http_in_flight") == 0


def test_failures_count_with_their_status():
    class Failing(FakeBackend):
        def generate(self, req):
            yield wire.Fail(id=req.id, code="overloaded", message="busy", node="n2")

    c = falcon.testing.TestClient(create_app(Failing(), cluster=FakeCluster()))
    assert c.simulate_post("/v1/chat/completions", json=CHAT).status_code == 503
    got = scrape(c)
    assert value(got, "zswarm_http_requests_total", node="n2", model=MODEL, status="503") == 1
    assert value(got, "zswarm_http_in_flight") == 0


def test_a_node_that_does_not_answer_is_node_up_0_not_an_error():
    fake = FakeCluster()
    fake.down = True
    c = falcon.testing.TestClient(create_app(FakeBackend(), cluster=fake))
    got = scrape(c)
    assert value(got, "zswarm_node_up") == 0
    assert ("zswarm_peers", (("state", "alive"),)) not in got
    assert ("zswarm_http_in_flight", ()) in got  # this process's series are still there
    c = falcon.testing.TestClient(create_app(FakeBackend()))  # no admin socket configured at all
    assert scrape(c)[("zswarm_http_in_flight", ())] == 0


def test_metrics_need_the_api_key_when_keys_are_set():
    c = falcon.testing.TestClient(create_app(FakeBackend(), api_keys=["k"], cluster=FakeCluster()))
    assert c.simulate_get("/metrics").status_code == 401
    assert c.simulate_get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200


def test_two_apps_in_one_process_do_not_collide():
    a = falcon.testing.TestClient(create_app(FakeBackend(), cluster=FakeCluster()))
    b = falcon.testing.TestClient(create_app(FakeBackend(), cluster=FakeCluster()))
    a.simulate_post("/v1/chat/completions", json=CHAT)
    assert value(scrape(b), "zswarm_http_requests_total", node="5e1f00000000aaaa", model=MODEL, status="200") == 0


# --- real nodes ---

def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


@pytest.mark.slow
def test_real_node_metrics_parse_and_move(tmp_path):
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        s1 = c.node("s1", "server", extra=["--p2p", "--federated", "--threads", "1"])
        f = c.node("f", "federated", bootstrap=[s1])
        wait_for(lambda: any(MODEL in r["models"] for r in f.admin("status")["gateway"]["routes"]), 90, 0.2,
                 what="s1 routable from the entry point")
        url = f"http://{f.args[f.args.index('--address') + 1]}"
        wait_for(lambda: _up(url), 30, 0.2, what="the entry point's API")
        before = samples(get(url + "/metrics"))
        s1_id = s1.node_id()
        body = json.dumps(CHAT).encode()
        for _ in range(2):
            req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                assert json.loads(r.read())["usage"]["completion_tokens"] > 0
        # node figures come from a snapshot kept for half a second: poll until it shows the requests
        def fresh():
            scraped = samples(get(url + "/metrics"))
            return scraped if value(scraped, "zswarm_routed_requests_total", node=s1_id, name="s1") == 2 else None
        after = wait_for(fresh, 10, 0.2, what="the node's counters to show both requests")
        assert value(after, "zswarm_node_up") == 1
        assert value(after, "zswarm_http_requests_total", node=s1_id, model=MODEL, status="200") == 2
        assert value(after, "zswarm_tokens_generated_total", node=s1_id, model=MODEL) > 0
        assert value(after, "zswarm_time_to_first_token_seconds_count", model=MODEL) == 2
        assert value(after, "zswarm_request_duration_seconds_count", model=MODEL) == 2
        assert value(after, "zswarm_peers", state="alive") == 1
        gossip_before = value(before, "zswarm_gossip_messages_total", direction="in")
        wait_for(lambda: value(samples(get(url + "/metrics")), "zswarm_gossip_messages_total",
                               direction="in") > gossip_before, 10, 0.2, what="gossip counters to move")
        assert value(after, "zswarm_gateway_requests_total", outcome="done") >= 2
        assert value(after, "zswarm_routed_requests_total", node=s1_id, name="s1") == 2
        assert value(after, "zswarm_http_in_flight") == 0
        # the serving node counts its engine's restarts (none yet)
        s1_url = f"http://{s1.args[s1.args.index('--address') + 1]}"
        wait_for(lambda: _up(s1_url), 30, 0.2, what="s1's API")
        assert value(samples(get(s1_url + "/metrics")), "zswarm_child_restarts_total", child="engine") == 0
    finally:
        c.close()


def _up(url: str) -> bool:
    try:
        get(url + "/healthz")
        return True
    except (urllib.error.URLError, ConnectionError, socket.timeout):
        return False
