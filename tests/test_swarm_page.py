"""The Swarm page and the cluster API (/api/p2p, /api/p2p/stats, /api/p2p/token).

Three layers: the shaping of admin answers into nodes by role (no socket); the routes and the
page in real headless Chromium against a scripted cluster of 50 nodes; and, marked slow, the
acceptance test: two real `zswarm server --p2p --federated` nodes, the page served by one of
them, its copy buttons, a node started from the copied command, and a SIGKILLed node.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import falcon.testing
import pytest

from cluster import REPO, Cluster, free_port, wait_for
from swarm_fakes import (MODEL, FakeBackend, FakeCluster, browser, fifty_peers, new_page, peer,  # noqa: F401 (fixture)
                         screenshot, serve_wsgi, shard_of)
from zswarm.http import create_app
from zswarm.http.cluster import AdminCluster, Snapshot, cluster_stats, cluster_view
from zswarm.token import Token

# What the page promises (swarm.js polls every second; the ledger marks a silent node suspect
# after 2 s and dead after 4 s): a change reaches the table within 3 s, a killed node shows as
# offline within 4 s + 3 s.
UPDATE_S = 3.0
OFFLINE_S = 7.0


def client(cluster=None, keys=(), backend=None) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(backend or FakeBackend(), api_keys=keys, node_name="entry",
                                                cluster=cluster if cluster is not None else FakeCluster()))


# --- shaping, no socket ---

def test_nodes_are_grouped_by_role_with_this_node_first():
    peers = [peer(1, "server", flags=["federated"]), peer(2, "server"), peer(3, "worker"),
             peer(4, "federated", state="dead"), peer(5, "worker", state="suspect"),
             {**peer(6, "worker"), "role": "", "name": ""}]  # a record not yet arrived: not listed
    fake = FakeCluster(peers)
    fake.served = {peers[0]["id"]: 4, fake.self_id: 2}
    view = cluster_view(fake.snapshot())
    assert [n["name"] for n in view["federated"]] == ["entry", "server-01"]
    assert view["federated"][0]["self"] and view["federated"][0]["online"]
    assert [n["name"] for n in view["servers"]] == ["server-02"]
    assert [n["name"] for n in view["workers"]] == ["worker-03", "worker-05"]
    assert [n["name"] for n in view["balancers"]] == ["federated-04"]
    me, s1 = view["federated"]
    assert (me["served"], me["in_flight"], me["models"], me["mem_total"]) == (2, 1, [MODEL], 16 << 30)
    assert (s1["served"], s1["in_flight"], s1["layers"]) == (4, peers[0]["in_flight"], None)
    assert view["balancers"][0]["state"] == "dead" and not view["balancers"][0]["online"]
    assert view["workers"][1]["state"] == "suspect" and not view["workers"][1]["online"]
    assert view["node"] == {"id": fake.self_id, "name": "entry", "role": "server", "network_id": "0123abcd",
                            "gossip": "127.0.0.1:7340", "software": "0.1.0"}
    assert view["split"] is None
    # LocalAI's names for the same nodes
    assert [n["Name"] for n in view["federated_nodes"]] == ["entry", "server-01"]
    workers = ["worker-03", "worker-05"]
    assert [n["Name"] for n in view["llama_cpp_nodes"]] == workers == [n["Name"] for n in view["nodes"]]
    assert set(view["federated_nodes"][0]) >= {"Name", "ID", "TunnelAddress", "ServiceID", "LastSeen"}
    assert view["federated_nodes"][0]["TunnelAddress"] == "127.0.0.1:7341" and view["mlx_nodes"] == []
    assert view["federated_nodes"][0]["LastSeen"].endswith("Z")
    assert cluster_stats(view) == {"federated": {"online": 2, "total": 2}, "servers": {"online": 1, "total": 1},
                                   "workers": {"online": 1, "total": 2}, "balancers": {"online": 0, "total": 1},
                                   "all": {"online": 4, "total": 6}}


def test_layers_come_from_the_shard_report():
    peers = [peer(i, "worker") for i in range(1, 4)]
    shard = shard_of(peers, 2)
    view = cluster_view(FakeCluster(peers, shard=shard).snapshot())
    layers = {n["name"]: n["layers"] for n in view["workers"]}
    assert layers == {"worker-01": 3, "worker-02": 5, "worker-03": 0}
    assert view["federated"][0]["layers"] == 6
    split = view["split"]
    assert split["n_layers"] == 14 and split["model"] == MODEL and split["reshards"] == 2 and split["error"] is None
    assert [(p["name"], p["layers"], p["local"]) for p in split["parts"]] == [
        ("entry", 6, True), ("worker-01", 3, False), ("worker-02", 5, False)]


def test_a_shard_without_workers_is_no_split():
    shard = {"workers": [], "local_layers": 30, "n_layers": 30, "reshards": 0, "error": "", "pending": False}
    view = cluster_view(FakeCluster([peer(1, "worker")], shard=shard).snapshot())
    assert view["split"] is None
    assert view["federated"][0]["layers"] == 30 and view["workers"][0]["layers"] is None
    view = cluster_view(FakeCluster(shard={"workers": [], "local_layers": 0, "n_layers": 0}).snapshot())
    assert view["split"] is None and view["federated"][0]["layers"] is None


def test_odd_admin_answers_do_not_break_the_view():
    status = {"id": "a", "role": "server", "shard": {"workers": [None, {"id": 5}, {"id": "w", "layers": -3}]},
              "gateway": None}
    view = cluster_view(Snapshot(status, [{"id": "b"}, "junk", {"id": "c", "role": "worker", "state": "alive"}], [],
                                 time.time()))
    assert [n["id"] for n in view["servers"]] == ["a"]
    assert [n["id"] for n in view["workers"]] == ["c"]
    assert view["split"]["parts"] == [{"id": "w", "name": "", "layers": 0, "mem": 0, "local": False}]


def test_admin_cluster_without_a_node_is_unavailable(tmp_path):
    from zswarm.http.cluster import ClusterUnavailable

    with pytest.raises(ClusterUnavailable):
        AdminCluster(str(tmp_path), timeout_s=0.2).snapshot()
    with pytest.raises(ClusterUnavailable):
        AdminCluster(str(tmp_path), timeout_s=0.2).token()


# --- the routes ---

def test_api_p2p_routes():
    fake = FakeCluster([peer(1, "worker"), peer(2, "server", flags=["federated"])])
    c = client(fake)
    r = c.simulate_get("/api/p2p")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert {n["name"] for g in ("federated", "workers", "servers", "balancers") for n in r.json[g]} == {
        "entry", "worker-01", "server-02"}
    r = c.simulate_get("/api/p2p/stats")
    assert r.json["workers"] == {"online": 1, "total": 1} and r.json["all"] == {"online": 3, "total": 3}
    r = c.simulate_get("/api/p2p/token", host="127.0.0.1:8080", remote_addr="127.0.0.1")  # this machine
    assert r.status_code == 200 and r.text == "zs1FAKETOKEN"
    assert r.headers["content-type"].startswith("text/plain")
    # without keys, nobody else: another machine, or a foreign Host (DNS rebinding)
    for host, remote in (("127.0.0.1", "192.0.2.7"), ("attacker.example", "127.0.0.1"), ("127.0.0.1", None)):
        r = c.simulate_get("/api/p2p/token", host=host, remote_addr=remote)
        assert r.status_code == 403 and "zswarm admin token" in r.json["error"]["message"], (host, remote)
        assert "zs1FAKETOKEN" not in r.text


def test_token_needs_an_api_key_when_keys_are_set():
    c = client(keys=["k1"])
    for path in ("/api/p2p/token", "/api/p2p", "/api/p2p/stats", "/metrics"):
        r = c.simulate_get(path)
        assert r.status_code == 401, path
        assert r.json["error"]["code"] == "invalid_api_key"
        assert "zs1FAKETOKEN" not in r.text
    assert c.simulate_get("/api/p2p/token", headers={"Authorization": "Bearer k1"}).text == "zs1FAKETOKEN"
    assert c.simulate_get("/api/p2p/token", headers={"x-api-key": "k1"}).text == "zs1FAKETOKEN"
    assert c.simulate_get("/api/p2p/token", headers={"Authorization": "Bearer k2"}).status_code == 401
    # the page, its files, health and the API description stay public: they hold no data
    for path in ("/swarm", "/swarm/swarm.js", "/swarm/swarm.css", "/healthz", "/readyz", "/openapi.json"):
        assert c.simulate_get(path).status_code == 200, path
    assert c.simulate_get("/").status_code == 302


def test_cluster_unavailable_is_503_never_500():
    fake = FakeCluster()
    fake.down = True
    c = client(fake)
    for path in ("/api/p2p", "/api/p2p/stats", "/api/p2p/token"):
        r = c.simulate_get(path, host="127.0.0.1", remote_addr="127.0.0.1")
        assert r.status_code == 503, path
        assert r.json["error"]["code"] == "node_unavailable"
    c = falcon.testing.TestClient(create_app(FakeBackend()))  # no ZSWARM_STATE_DIR at all
    assert c.simulate_get("/api/p2p").status_code == 503
    assert c.simulate_get("/swarm").status_code == 200


def test_gunicorn_factory_reads_the_state_dir(tmp_path):
    from zswarm.http.wsgi import app_factory

    from zswarm.http.wsgi import ConfigError

    env = {"ZSWARM_NODE_ENDPOINT": f"ipc://{tmp_path}/gateway.sock", "ZSWARM_STATE_DIR": str(tmp_path),
           "ZSWARM_KEYS_WAIT_S": "0.3"}
    # no node runs there: the API keys cannot be read, so no server starts (never an open API)
    with pytest.raises(ConfigError, match=str(tmp_path)):
        app_factory(env)
    del env["ZSWARM_STATE_DIR"]
    r = falcon.testing.TestClient(app_factory(env)).simulate_get("/api/p2p/token", host="localhost",
                                                                  remote_addr="127.0.0.1")
    assert r.status_code == 503 and "ZSWARM_STATE_DIR" in r.json["error"]["message"]


def test_no_cluster_token_is_404():
    r = client(FakeCluster(token="")).simulate_get("/api/p2p/token", host="localhost", remote_addr="::1")
    assert r.status_code == 404 and r.json["error"]["code"] == "no_cluster"


def test_page_and_assets():
    c = client()
    r = c.simulate_get("/swarm")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    html = r.text
    assert "/swarm/swarm.js" in html and "/swarm/swarm.css" in html
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere: works offline
    for name in ("swarm.js", "swarm.css"):
        body = c.simulate_get(f"/swarm/{name}").text
        assert "http://" not in body and "https://" not in body and "@import" not in body
    assert c.simulate_get("/swarm/swarm.js").headers["content-type"].startswith("text/javascript")
    assert c.simulate_get("/swarm/nope.js").status_code == 404
    assert c.simulate_get("/swarm/..%2Fapp.py").status_code == 404
    assert c.simulate_get("/").headers["location"].endswith("/swarm")


def test_readyz():
    assert client().simulate_get("/readyz").json == {"status": "ready", "reason": "", "models": [MODEL]}
    r = client(backend=FakeBackend(models=[])).simulate_get("/readyz")
    assert r.status_code == 503 and r.json["status"] == "unready"
    r = client(backend=FakeBackend(down=True)).simulate_get("/readyz")
    assert r.status_code == 503 and "not available" in r.json["reason"]
    assert client(backend=FakeBackend(down=True)).simulate_get("/healthz").status_code == 200


# --- the page in Chromium, scripted cluster ---

def rows(page) -> dict[str, dict]:
    """The table as the operator sees it: node id -> column texts."""
    return page.eval_on_selector_all("#rows tr", """trs => Object.fromEntries(trs.map(tr => [tr.dataset.nodeId, {
        state: tr.dataset.state, status: tr.querySelector('.c-state').textContent,
        name: tr.querySelector('.nname').textContent, role: tr.querySelector('.c-role').textContent,
        model: tr.querySelector('.c-model').textContent, mem: tr.querySelector('.c-mem').textContent,
        inflight: tr.querySelector('.c-inflight').textContent, layers: tr.querySelector('.c-layers').textContent,
        served: tr.querySelector('.c-served').textContent, tps: tr.querySelector('.c-tps').textContent,
        prefix: tr.querySelector('.c-prefix').textContent}]))""")


def wait_js(page, expression: str, timeout_s: float) -> object:
    """Poll a JavaScript expression until truthy. (Playwright's wait_for_function evaluates a
    string inside the page, which the page's Content-Security-Policy rightly forbids.)"""
    deadline = time.monotonic() + timeout_s
    while not (value := page.evaluate(expression)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{expression} still false after {timeout_s} s")
        page.wait_for_timeout(50)
    return value


def wait_rows(page, predicate, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        got = rows(page)
        if predicate(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"the table did not show {what} within {timeout_s} s; it shows {got}")
        page.wait_for_timeout(100)


def test_page_with_fifty_nodes_is_readable(browser):
    peers = fifty_peers(xss=True)
    fake = FakeCluster(peers, shard=shard_of(peers))
    with serve_wsgi(create_app(FakeBackend(), node_name="entry", cluster=fake)) as url:
        page = new_page(browser, url)
        page.goto(url + "/swarm")
        got = wait_rows(page, lambda r: len(r) == 50, 5, "50 nodes")
        assert got[fake.self_id]["layers"] == "6" and got[fake.self_id]["status"] == "online"
        dead = next(p for p in peers if p["state"] == "dead")
        assert got[dead["id"]]["status"] == "offline"
        worker = shard_of(peers)["workers"][1]
        assert got[worker["id"]]["layers"] == str(worker["layers"])
        assert "GiB" in got[peers[1]["id"]]["mem"]
        # names are text, never markup
        assert got[peers[0]["id"]]["name"] == peers[0]["name"]
        assert page.evaluate("window.pwned") is None
        assert page.locator("#split-stack > div").count() == 6
        assert page.locator("#split-parts .pbar").count() == 6
        # readable: nothing wider than the window, one line per row, numbers not clipped
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        heights = page.eval_on_selector_all("#rows tr", "trs => trs.map(tr => tr.getBoundingClientRect().height)")
        assert max(heights) < 40, heights
        assert page.locator(".stat[data-group=workers] b").text_content() == str(
            sum(p["role"] == "worker" and p["state"] == "alive" for p in peers))
        # filters
        page.click("[data-filter=workers]")
        assert set(r["role"] for r in rows(page).values()) == {"worker"}
        page.fill("#search", "worker-05")
        assert [r["name"] for r in rows(page).values()] == ["worker-05.rack1.lab.example"]
        page.fill("#search", "")
        page.click("[data-filter=all]")
        assert len(rows(page)) == 50
        screenshot(page, "swarm-50-nodes.png")
        # a narrow window (a laptop split screen) still fits the page, the table scrolls inside
        page.set_viewport_size({"width": 820, "height": 900})
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert page.script_errors == [] and page.outside_requests == []
        page.context.close()


def test_page_shows_a_model_being_fetched(browser):
    fetching = {**peer(1, "server", models=[]), "decode_tps": 42.4, "holdings": [
        {"name": "big-model", "sha256": "ab" * 32, "size": 1000, "have": 450},
        {"name": "done-model", "sha256": "cd" * 32, "size": 10, "have": 10}]}
    fake = FakeCluster([fetching])
    view = cluster_view(fake.snapshot())
    assert view["servers"][0]["fetching"] == [{"name": "big-model", "percent": 45.0}]
    with serve_wsgi(create_app(FakeBackend(), node_name="entry", cluster=fake)) as url:
        page = new_page(browser, url)
        page.goto(url + "/swarm")
        got = wait_rows(page, lambda r: fetching["id"] in r, 5, "the fetching node")
        assert got[fetching["id"]]["model"] == "fetching big-model 45%"
        assert (got[fetching["id"]]["tps"], got[fetching["id"]]["prefix"]) == ("42", "0")
        assert got[fake.self_id]["tps"] == "—"  # not measured yet
        width = page.eval_on_selector(f"tr[data-node-id='{fetching['id']}'] .fetchbar > div", "d => d.style.width")
        assert width == "45%"  # the browser normalises "45.0%"
        assert page.script_errors == []
        page.context.close()


def test_page_asks_for_the_api_key(browser):
    fake = FakeCluster([peer(1, "server", flags=["federated"])])
    with serve_wsgi(create_app(FakeBackend(), api_keys=["sekrit"], node_name="entry", cluster=fake)) as url:
        page = new_page(browser, url)
        page.goto(url + "/swarm")
        page.wait_for_selector("#auth:not([hidden])", timeout=5000)
        assert page.locator("#token").text_content() != fake.tok
        page.fill("#auth-key", "wrong")
        page.click("#auth-form button")
        wait_js(page, "document.getElementById('auth-error').textContent !== ''", 5)
        page.fill("#auth-key", "sekrit")
        page.click("#auth-form button")
        wait_rows(page, lambda r: len(r) == 2, 5, "both nodes after the key")
        wait_js(page, f"document.getElementById('token').textContent === {json.dumps(fake.tok)}", 5)
        assert page.locator("#auth").is_hidden()
        assert page.script_errors == []
        page.context.close()


def test_page_says_when_the_node_is_unreachable(browser):
    fake = FakeCluster([peer(1, "worker")])
    with serve_wsgi(create_app(FakeBackend(), node_name="entry", cluster=fake)) as url:
        page = new_page(browser, url)
        page.goto(url + "/swarm")
        wait_rows(page, lambda r: len(r) == 2, 5, "both nodes")
        fake.down = True
        page.wait_for_selector("#live.bad", timeout=UPDATE_S * 1000)
        assert "cannot reach the node" in page.locator("#live-text").text_content()
        assert len(rows(page)) == 2  # the last data stays, greyed
        fake.down = False
        page.wait_for_selector("#live.ok", timeout=UPDATE_S * 1000)
        page.context.close()


# --- acceptance: real nodes, real browser ---

SERVER_ARGS = ["--p2p", "--federated", "--threads", "1"]


def api_url(node) -> str:
    return f"http://{node.args[node.args.index('--address') + 1]}"


def http_get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def chat(node) -> dict:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(api_url(node) + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swarm")
    token = Token.generate().encode()
    c = Cluster(tmp, token)
    try:
        s1 = c.node("s1", "server", extra=SERVER_ARGS)
        s2 = c.node("s2", "server", bootstrap=[s1], extra=SERVER_ARGS)
        wait_for(lambda: len([r for r in s1.admin("status")["gateway"]["routes"] if MODEL in r["models"]]) == 2,
                 90, 0.2, what="both servers routable from s1")
        wait_for(lambda: http_get(api_url(s1) + "/readyz")[0] == 200, 30, 0.2, what="s1's API")
        yield c, s1, s2, token, tmp
    finally:
        c.close()


@pytest.mark.slow
def test_real_cluster_page_shows_both_nodes_and_copies_the_token(real, browser):
    c, s1, s2, token, tmp = real
    url = api_url(s1)
    ids = {s1.node_id(): "s1", s2.node_id(): "s2"}
    page = new_page(browser, url)
    page.goto(url + "/swarm")
    got = wait_rows(page, lambda r: all(i in r and r[i]["status"] == "online" for i in ids), 10, "s1 and s2 online")
    for node_id in ids:
        assert got[node_id]["name"] == ids[node_id]
        assert got[node_id]["role"] == "federated"
        assert got[node_id]["model"] == MODEL
        assert "GiB" in got[node_id]["mem"]
    # no split: s1 shows the layers its engine reported holding (if it did), s2 none of s1's
    local = (s1.admin("status").get("shard") or {}).get("local_layers") or "—"
    assert (got[s1.node_id()]["layers"], got[s2.node_id()]["layers"]) == (str(local), "—")
    assert page.locator(".stat[data-group=federated] b").text_content() == "2"

    # the copy button puts the real token on the clipboard
    page.click("#copy-token")
    page.wait_for_selector("#copy-token.done", timeout=2000)
    assert page.evaluate("navigator.clipboard.readText()") == token
    gossip = s1.admin("status")["endpoints"]["gossip"][len("tcp://"):]
    page.click("button[data-copy=cmd-worker]")
    wait_js(page, "navigator.clipboard.readText().then(t => t.includes('worker'))", 2)
    # the token goes in the environment, never in argv
    assert page.evaluate("navigator.clipboard.readText()") == f"ZSWARM_TOKEN={token} zswarm worker --bootstrap {gossip}"

    # requests served show up within the refresh time
    before = sum(int(r["served"]) for r in rows(page).values())
    chat(s1)
    chat(s1)
    wait_rows(page, lambda r: sum(int(x["served"]) for x in r.values()) >= before + 2, UPDATE_S, "2 more served")

    # a node started with the copied command (plus this test's isolation flags) joins, and the
    # table shows it within UPDATE_S of the node knowing it
    page.click("button[data-copy=cmd-balancer]")
    wait_js(page, "navigator.clipboard.readText().then(t => t.includes('zswarm federated'))", 2)
    argv = shlex.split(page.evaluate("navigator.clipboard.readText()"))
    assert argv[:3] == [f"ZSWARM_TOKEN={token}", "zswarm", "federated"] and "--token" not in argv
    port = free_port(span=2)
    entry_log = open(tmp / "copied.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "zswarm", *argv[2:], "--no-mdns", "--name", "copied",
                             "--state-dir", str(tmp / "copied"), "--p2p-listen", f"127.0.0.1:{port}",
                             "--address", f"127.0.0.1:{free_port()}"],
                            stdout=entry_log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "ZSWARM_TOKEN": argv[0].split("=", 1)[1]})
    try:
        wait_for(lambda: "copied" in s1.alive_peer_names(), 20, 0.05, what="s1 to know the copied node")
        seen_at = time.monotonic()
        got = wait_rows(page, lambda r: any(x["name"] == "copied" for x in r.values()), UPDATE_S,
                        "the node started from the copied command")
        assert time.monotonic() - seen_at <= UPDATE_S
        assert next(x for x in got.values() if x["name"] == "copied")["role"] == "entry point"
        proc.send_signal(signal.SIGTERM)  # a clean leave: the ledger drops it at once
        assert proc.wait(15) == 0
        wait_rows(page, lambda r: all(x["name"] != "copied" for x in r.values()), UPDATE_S + 2,
                  "the copied node gone after it left")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        entry_log.close()
    path = screenshot(page, "swarm-cluster.png")
    assert path.stat().st_size > 10_000
    assert page.script_errors == [] and page.outside_requests == []
    page.context.close()


@pytest.mark.slow
def test_real_cluster_killed_node_turns_offline(real, browser):
    """Runs last in this module: it SIGKILLs s2."""
    c, s1, s2, token, tmp = real
    url = api_url(s1)
    s2_id = s2.node_id()
    page = new_page(browser, url)
    page.goto(url + "/swarm")
    wait_rows(page, lambda r: r.get(s2_id, {}).get("status") == "online", 10, "s2 online")
    s2.signal(signal.SIGKILL)
    killed = time.monotonic()
    s2.wait(10)
    wait_rows(page, lambda r: s2_id not in r or r[s2_id]["status"] == "offline", OFFLINE_S, "s2 offline")
    took = time.monotonic() - killed
    assert took <= OFFLINE_S
    assert page.locator(".stat[data-group=federated] b").text_content() == "1"
    screenshot(page, "swarm-cluster-offline.png")
    status, body = http_get(url + "/api/p2p/stats")
    assert status == 200 and json.loads(body)["federated"] == {"online": 1, "total": 2}
    print(f"s2 shown offline {took:.1f} s after SIGKILL")
    assert page.script_errors == [] and page.outside_requests == []
    page.context.close()
