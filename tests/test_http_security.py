"""The HTTP API against outsiders (issue 12): who gets the cluster token, DNS rebinding, slow
clients, and the API keys kept out of the HTTP child's environment and argv.

Real nodes (``zswarm federated``: HTTP and a token, no model to load, so a node is up in about
two seconds), mDNS off, traffic to 127.0.0.1 only, or inside network namespaces this module
creates (tests/netns.py) for the client on another machine.
"""

from __future__ import annotations

import http.client
import signal
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from cluster import Cluster, descendants, wait_for
from slowclient import SlowHeaders
from netns import NetnsLab, netns_available
from swarm_fakes import FakeBackend, FakeCluster, browser, new_page, serve_wsgi  # noqa: F401 (fixture)
from zswarm.http.app import create_app
from zswarm.token import Token

KEY = "zsk-test-" + "k" * 24


def get(port: int, path: str, host: str | None = None, headers: dict[str, str] | None = None,
        addr: str = "127.0.0.1", timeout_s: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(addr, port, timeout=timeout_s)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host if host is not None else f"{addr}:{port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def http_port(node) -> int:
    return int(node.args[node.args.index("--address") + 1].rsplit(":", 1)[1])


def wait_http(node, port: int, addr: str = "127.0.0.1") -> None:
    def up() -> bool:
        assert node.running(), node.log()[-3000:]
        return get(port, "/healthz", addr=addr, timeout_s=1)[0] == 200
    wait_for(up, 30, 0.1, what=f"{node.name}'s API")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two entry points on 127.0.0.1: ``open`` without API keys, ``keyed`` with KEY (given the
    way the Ansible role gives it: ZSWARM_API_KEYS in the node's environment)."""
    tmp = tmp_path_factory.mktemp("httpsec")
    token = Token.generate().encode()
    c = Cluster(tmp, token)
    try:
        env = {k: "" for k in ("ZSWARM_API_KEYS", "LOCALAI_API_KEY", "API_KEY")}
        opened = c.node("open", "federated", env=env)
        keyed = c.node("keyed", "federated", env={**env, "ZSWARM_API_KEYS": KEY})
        for n in (opened, keyed):
            wait_http(n, http_port(n))
        yield c, opened, keyed, token
    finally:
        c.close()


# --- the token over HTTP -------------------------------------------------------------------------

def test_token_only_to_this_machine_naming_a_loopback_host(nodes):
    c, node, _, token = nodes
    port = http_port(node)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1"):
        assert get(port, "/api/p2p/token", host=host) == (200, token.encode()), host
    # DNS rebinding: the browser connects to 127.0.0.1 but names the attacker's host. A server
    # bound to loopback refuses such a request on every route (421), the token's included.
    for path in ("/api/p2p/token", "/healthz", "/v1/models", "/api/p2p", "/swarm"):
        status, body = get(port, path, host="attacker.example")
        assert status == 421 and token.encode() not in body, (path, status)
        assert b"misdirected_request" in body
    status, body = get(port, "/api/p2p/token", host=f"attacker.example:{port}")
    assert status == 421 and token.encode() not in body
    # the page is told the API is not open to the network (loopback bind)
    status, body = get(port, "/api/p2p")
    assert status == 200 and b'"open_to_network":false' in body


def test_with_keys_the_token_needs_a_key(nodes):
    c, _, node, token = nodes
    port = http_port(node)
    status, body = get(port, "/api/p2p/token")
    assert status == 401 and token.encode() not in body
    assert get(port, "/api/p2p/token", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert get(port, "/api/p2p/token", headers={"Authorization": f"Bearer {KEY}"}) == (200, token.encode())
    base = f"http://127.0.0.1:{port}/v1"
    with openai.OpenAI(base_url=base, api_key="wrong", max_retries=0, timeout=10) as api:
        with pytest.raises(openai.AuthenticationError):
            api.models.list()
    with openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=10) as api:
        assert api.models.list().data == []  # an entry point with no server behind it yet


@pytest.mark.netns
def test_no_keys_token_refused_to_another_machine_and_the_open_api_warns(tmp_path):
    reason = netns_available()
    if reason:
        pytest.fail(f"network namespaces are needed for this test: {reason}")
    with NetnsLab(2, prefix="zshttp") as lab:
        server, client = lab.hosts
        c = Cluster(tmp_path, Token.generate().encode())
        try:
            # bound to every address of its namespace, without keys: open to the network
            n = c.node("wide", "federated", host=server.addr, prefix=server.exec_prefix,
                       extra=["--address", "0.0.0.0:8080", "--http-workers", "2"],
                       env={"ZSWARM_API_KEYS": ""})

            def ask(host, target: str, host_header: str, path: str = "/api/p2p/token") -> tuple[int, str]:
                """GET ``path`` from inside ``host``'s namespace (a netns.Host) to ``target``:8080."""
                r = host.run([sys.executable, "-c", CLIENT, target, host_header, path], capture_output=True,
                             text=True, timeout=20)
                assert r.returncode == 0, r.stderr[-2000:]
                status, _, body = r.stdout.partition(" ")
                return int(status), body

            def running() -> None:
                assert n.running(), n.log()[-3000:]
            wait_for(lambda: ask(client, server.addr, server.addr, "/healthz")[0] == 200, 30, 0.2,
                     what="the namespaced node's API", check=running, retry=(AssertionError,))
            # another machine: refused, and told how to get the token
            status, body = ask(client, server.addr, f"{server.addr}:8080")
            assert status == 403 and "zswarm admin token" in body and c.token not in body, body
            status, body = ask(client, server.addr, "127.0.0.1:8080")  # naming a loopback Host does not help
            assert status == 403 and c.token not in body
            # the node's own machine, naming a loopback Host: served
            assert ask(server, "127.0.0.1", "127.0.0.1:8080") == (200, c.token)
            # the same machine naming a foreign Host (a browser under DNS rebinding): refused
            status, body = ask(server, "127.0.0.1", "attacker.example")
            assert status == 403 and c.token not in body
            # the Swarm page's data says the API is open, for its banner
            status, body = ask(client, server.addr, server.addr, "/api/p2p")
            assert status == 200 and '"open_to_network":true' in body, body
            n.signal(signal.SIGTERM)
            assert n.wait(20) == 0
            # one warning at start, not one per gunicorn worker (two here)
            assert n.log().count("Booting worker") >= 2, n.log()[-4000:]
            assert n.log().count("is open to the network without API keys") == 1, n.log()[-4000:]
        finally:
            c.close()


CLIENT = """
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=10)
c.putrequest("GET", sys.argv[3], skip_host=True)
c.putheader("Host", sys.argv[2])
c.endheaders()
r = c.getresponse()
print(r.status, r.read().decode(), end="")
"""


# --- slow clients --------------------------------------------------------------------------------

def test_forty_slow_header_clients_do_not_stall_healthz_and_are_dropped(nodes):
    c, node, _, _ = nodes
    port = http_port(node)
    stop = threading.Event()
    slow = [SlowHeaders(port, stop) for _ in range(40)]
    try:
        for s in slow:
            s.start()
        wait_for(lambda: all(s.connected for s in slow), 10, what="40 slow clients connected", retry=())
        started = time.monotonic()
        worst, probes = 0.0, 0
        while time.monotonic() - started < 15:
            t0 = time.monotonic()
            status, _ = get(port, "/healthz", timeout_s=2.0)  # a socket timeout past 2 s fails the test
            took = time.monotonic() - t0
            assert status == 200 and took < 2.0, f"/healthz took {took:.2f} s with 40 slow clients"
            worst, probes = max(worst, took), probes + 1
            time.sleep(0.2)
        cut = [s.cut_after_s for s in slow if s.cut_after_s is not None]
        print(f"/healthz: {probes} probes, worst {1000 * worst:.0f} ms; slow clients cut after "
              f"{min(cut, default=0):.1f}-{max(cut, default=0):.1f} s ({len(cut)} of 40)")
        # the header deadline (10 s, zswarm/http/worker.py) dropped every one of them
        assert len(cut) == 40 and all(8 <= t <= 13 for t in cut), cut
    finally:
        stop.set()
        for s in slow:
            s.join(5)


# --- no API key (nor the token) in the HTTP child ------------------------------------------------

def test_http_child_has_no_api_key_in_environ_or_cmdline(nodes):
    c, _, node, token = nodes
    assert get(http_port(node), "/api/p2p/token", headers={"x-api-key": KEY})[0] == 200  # the key works
    procs = descendants(node.proc.pid)
    gunicorn = [p for p in procs if b"gunicorn" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(gunicorn) >= 2, "expected gunicorn's master and a worker under the node"
    for pid in procs:
        for part in ("environ", "cmdline"):
            data = Path(f"/proc/{pid}/{part}").read_bytes()
            assert KEY.encode() not in data, f"the API key is in /proc/{pid}/{part}"
            assert token.encode() not in data, f"the token is in /proc/{pid}/{part}"
    # ...while the node itself was given the key through its environment
    assert KEY.encode() in Path(f"/proc/{node.proc.pid}/environ").read_bytes()


# --- the Swarm page ----------------------------------------------------------------------------

def _from_elsewhere(app):
    """``app`` as a client on another machine reaches it (the test's browser runs here)."""
    def wrapped(environ, start_response):
        return app({**environ, "REMOTE_ADDR": "192.0.2.5"}, start_response)
    return wrapped


def _wait_text(page, selector: str, needle: str, timeout_s: float = 5.0) -> str:
    deadline = time.monotonic() + timeout_s
    while needle not in (text := page.locator(selector).text_content() or ""):
        assert time.monotonic() < deadline, f"{selector} says {text!r}, not {needle!r}"
        page.wait_for_timeout(50)
    return text


def test_page_warns_of_an_open_api_and_says_how_to_get_the_token(browser):
    fake = FakeCluster()
    app = create_app(FakeBackend(), node_name="entry", cluster=fake, bind_address="0.0.0.0:8080")
    with serve_wsgi(_from_elsewhere(app)) as url:
        page = new_page(browser, url)
        page.goto(url + "/swarm")
        page.wait_for_selector("#open-warning:not([hidden])", timeout=5000)
        assert "open to the network" in page.locator("#open-warning").text_content()
        _wait_text(page, "#token", "zswarm admin token")
        assert fake.tok not in page.content()
        assert page.locator("#copy-token").is_disabled()
        assert "zswarm admin token" in page.locator("#join-hint").text_content()
        assert page.locator("button[data-copy=cmd-worker]").is_disabled()
        assert page.script_errors == [] and page.outside_requests == []
        page.context.close()


def test_page_join_commands_carry_the_token_in_the_environment(browser):
    fake = FakeCluster()
    with serve_wsgi(create_app(FakeBackend(), node_name="entry", cluster=fake, bind_address="127.0.0.1:0")) as url:
        page = new_page(browser, url)
        page.goto(url + "/swarm")
        gossip = "127.0.0.1:7340"
        want = {"cmd-worker": f"ZSWARM_TOKEN={fake.tok} zswarm worker --bootstrap {gossip}",
                "cmd-federated": f"ZSWARM_TOKEN={fake.tok} zswarm server --p2p --federated --bootstrap {gossip}",
                "cmd-balancer": f"ZSWARM_TOKEN={fake.tok} zswarm federated --bootstrap {gossip}"}
        for cmd_id, text in want.items():
            assert _wait_text(page, f"#{cmd_id}", "ZSWARM_TOKEN=") == text
            # only the token part may wrap; the rest never breaks inside a word
            assert page.locator(f"#{cmd_id} .tok").text_content() == f"ZSWARM_TOKEN={fake.tok}"
            page.click(f"button[data-copy={cmd_id}]")
            deadline = time.monotonic() + 2
            while page.evaluate("navigator.clipboard.readText()") != text:
                assert time.monotonic() < deadline, "the copy button did not copy the command"
                page.wait_for_timeout(50)
        assert page.locator("#open-warning").is_hidden()
        assert page.script_errors == [] and page.outside_requests == []
        page.context.close()
