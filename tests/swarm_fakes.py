"""Test doubles and helpers for the HTTP app's tests: the Swarm page, /api/p2p, /metrics, /openapi.json
and the OpenAI API (test_http_app.py builds its scripted backend on :class:`FakeBackend`).

The HTTP app takes its collaborators in its constructor (a Backend, a ClusterSource), so these
stand in for the node without monkey-patching; the acceptance tests use real nodes instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socketserver
import threading
import time
import wsgiref.simple_server
from pathlib import Path
from typing import Iterator

import pytest

from zswarm import wire
from zswarm.http.cluster import ClusterUnavailable, Snapshot

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
GiB = 1 << 30
MODEL = "smollm2-135m-instruct"


def peer(i: int, role: str, state: str = "alive", flags: list[str] | None = None, name: str | None = None,
         models: list[str] | None = None) -> dict:
    """One entry of the admin ``peers`` answer (zswarm.membership.Member.view)."""
    total = (8 + (i % 5) * 8) * GiB
    return {"id": f"{i:04x}" + "%012x" % (i * 2654435761 % (1 << 48)), "name": name or f"{role}-{i:02d}",
            "role": role, "state": state, "incarnation": 1, "last_seen_s": 0.4 if state == "alive" else 3.2,
            "endpoints": {"gossip": f"tcp://127.0.0.1:{20000 + i}"},
            "models": [MODEL] if models is None and role == "server" else list(models or []),
            "mem_total": total, "mem_free": int(total * (0.15 + (i * 37 % 70) / 100)), "in_flight": i % 3,
            "software": "0.1.0", "protocol": 1, "started_at": 1.7e9, "flags": list(flags or [])}


class FakeCluster:
    """A ClusterSource with a scripted cluster: this node plus ``peers``; ``down`` makes it unavailable."""

    def __init__(self, peers: list[dict] | None = None, token: str = "zs1FAKETOKEN", shard: dict | None = None,
                 role: str = "server", flags: tuple[str, ...] = ("federated",), counters: dict | None = None):
        self.self_id = "5e1f00000000aaaa"
        self.peers = list(peers or [])
        self.tok = token
        self.shard = shard
        self.role, self.flags = role, list(flags)
        self.counters = counters if counters is not None else {
            "gossip_in": 120, "gossip_out": 118, "gossip_in_bytes": 9000, "gossip_out_bytes": 8800,
            "requests_in": 7, "requests_done": 6, "requests_failed": 1, "restarts_engine": 2, "auth_denied": 3,
            "reshards": 1}
        self.served: dict[str, int] = {}
        self.down = False
        self.snapshots = 0

    def own(self) -> dict:
        return {"id": self.self_id, "name": "entry", "role": self.role, "incarnation": 1, "version": 3,
                "endpoints": {"gossip": "tcp://127.0.0.1:7340", "gateway": "tcp://127.0.0.1:7341"},
                "models": [MODEL] if self.role == "server" else [], "mem_total": 16 * GiB, "mem_free": 10 * GiB,
                "in_flight": 0, "software": "0.1.0", "protocol": 1, "started_at": 1.7e9, "flags": self.flags}

    def snapshot(self) -> Snapshot:
        if self.down:
            raise ClusterUnavailable("no node is running with state directory /nowhere")
        self.snapshots += 1
        status = {"id": self.self_id, "role": self.role, "network_id": "0123abcd", "state_dir": "/x",
                  "flags": self.flags, "name": "entry", "incarnation": 1, "software": "0.1.0", "uptime_s": 5.0,
                  "endpoints": self.own()["endpoints"],
                  "peers": {}, "discovery": None,
                  "gateway": {"policy": "p2c", "in_flight": 1, "per_node_in_flight": {self.self_id: 1},
                              "served": dict(self.served), "cooling": [], "engine": True,
                              "routes": [{"node": self.self_id, "name": "entry", "models": [MODEL], "local": True}]},
                  "children": {"engine": {"state": "running", "pid": 1, "restarts": 2, "last_exit": None},
                               "http": {"state": "running", "pid": 2, "restarts": 0, "last_exit": None}},
                  "counters": dict(self.counters)}
        if self.shard is not None:
            status["shard"] = self.shard
        return Snapshot(status, [dict(p) for p in self.peers], [self.own()] + [dict(p) for p in self.peers],
                        time.time())

    def token(self) -> str:
        if self.down:
            raise ClusterUnavailable("no node is running with state directory /nowhere")
        return self.tok


def fifty_peers(xss: bool = False) -> list[dict]:
    """49 peers of every role and state; with this node, 50."""
    roles = [("server", ["federated"]), ("worker", []), ("federated", []), ("server", [])]
    out = []
    for i in range(1, 50):
        role, flags = roles[i % 4]
        state = "dead" if i % 13 == 0 else "suspect" if i % 17 == 0 else "alive"
        name = f"{role}-{i:02d}.rack{i % 4}.lab.example"
        if xss and i == 1:
            name = '<img src=x onerror="window.pwned=1">'
        out.append(peer(i, role, state, flags, name=name))
    return out


def shard_of(peers: list[dict], n: int = 5) -> dict:
    workers = [p for p in peers if p["role"] == "worker"][:n]
    layers = [3 + 2 * j for j in range(len(workers))]
    return {"workers": [{"id": w["id"], "name": w["name"], "endpoint": "127.0.0.1:1", "mem": w["mem_total"],
                         "layers": k} for w, k in zip(workers, layers)],
            "local_layers": 6, "n_layers": 6 + sum(layers), "reshards": 2, "error": "", "pending": False}


class FakeBackend:
    """A Backend serving ``models``: every request gets two chunks and a Done from node ``node``."""

    def __init__(self, models: list[str] | None = None, node: str = "5e1f00000000aaaa", down: bool = False):
        self.model_names = [MODEL] if models is None else models
        self.node = node
        self.down = down
        self.cancelled: list[str] = []

    def models(self) -> list[str]:
        from zswarm.http import BackendUnavailable

        if self.down:
            raise BackendUnavailable("no answer")
        return list(self.model_names)

    def problem(self) -> str:
        return getattr(self, "problem_text", "")

    def recent(self) -> list[str]:
        return list(getattr(self, "recent_names", []))

    def generate(self, req: wire.GenRequest) -> Iterator[object]:
        yield wire.Chunk(req.id, "Hel")
        yield wire.Chunk(req.id, "lo")
        yield wire.Done(id=req.id, finish_reason="stop", prompt_tokens=5, completion_tokens=2, node=self.node)

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve_wsgi(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, _ThreadingWSGIServer, _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="test-wsgi",
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        assert not thread.is_alive(), "the WSGI server thread did not stop"


# Debian's chromium, driven by Playwright (its own browser downloads are not used).
CHROMIUM = os.environ.get("ZSWARM_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per module. Missing in CI is a failure; on a laptop, a skip."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install playwright)"
    if missing is None and not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def new_page(browser, base_url: str, width: int = 1400, height: int = 900):
    """A page in a fresh context that may use the clipboard, and that fails on any script error."""
    ctx = browser.new_context(viewport={"width": width, "height": height})
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # Nothing may be fetched from anywhere but the node itself (the page must work offline).
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((base_url, "data:")) else outside.append(r.url))
    page.script_errors = errors
    page.outside_requests = outside
    return page


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path
