"""NodeBackend against a stand-in node (a real ROUTER on an ipc socket), and the whole HTTP stack
under gunicorn: the openai client in, ZeroMQ out, a client disconnect arriving as a Cancel."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
import openai
import pytest
import zmq

from cluster import free_port
from zswarm import wire
from zswarm.http import BackendUnavailable
from zswarm.http.node_backend import NodeBackend

ROOT = Path(__file__).resolve().parents[1]


class FakeNode(threading.Thread):
    """Answers by model name: "m1" streams "a", "b" after a stray reply to another request;
    "fail" fails; "silent" never answers; "endless" streams until cancelled."""

    def __init__(self, endpoint: str):
        super().__init__(name="fake-node", daemon=True)
        self.endpoint = endpoint
        self.ctx = zmq.Context()
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.cancelled: list[str] = []
        self.cancel_event = threading.Event()
        self.models_queries = 0
        self.peers: dict[str, bytes] = {}  # request id -> routing id it came from
        self._endless: dict[str, bytes] = {}

    def run(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        try:
            sock.bind(self.endpoint)
            self.ready.set()
            while not self.stop_event.is_set():
                if sock.poll(10):
                    peer, payload = sock.recv_multipart()
                    self._handle(sock, peer, payload)
                for rid, peer in list(self._endless.items()):
                    self._send(sock, peer, wire.Chunk(rid, "x"))
        finally:
            sock.close()

    def _send(self, sock: zmq.Socket, peer: bytes, body) -> None:
        sock.send_multipart([peer, wire.encode_inference("node-1", body)])

    def _handle(self, sock: zmq.Socket, peer: bytes, payload: bytes) -> None:
        body = wire.decode_inference(payload).body
        if isinstance(body, wire.ModelsQuery):
            self.models_queries += 1
            self._send(sock, peer, wire.ModelsReply(body.id, ["m1", "endless"]))
        elif isinstance(body, wire.Cancel):
            self.cancelled.append(body.id)
            self._endless.pop(body.id, None)
            self.cancel_event.set()
        elif isinstance(body, wire.GenRequest):
            self.peers[body.id] = peer
            if body.model == "m1":
                self._send(sock, peer, wire.Chunk("someone-else", "stray"))
                self._send(sock, peer, wire.ModelsReply("stale", []))
                for text in ("a", "b"):
                    self._send(sock, peer, wire.Chunk(body.id, text))
                self._send(sock, peer, wire.Done(id=body.id, finish_reason="stop", prompt_tokens=4,
                                                 completion_tokens=2, node="node-1"))
            elif body.model == "fail":
                self._send(sock, peer, wire.Fail(id=body.id, code="overloaded", message="busy", node="node-1"))
            elif body.model == "endless":
                self._endless[body.id] = peer

    def close(self) -> None:
        self.stop_event.set()
        self.join(5)
        assert not self.is_alive(), "fake node thread leaked"
        self.ctx.term()


@pytest.fixture
def node(tmp_path):
    n = FakeNode(f"ipc://{tmp_path}/node.sock")
    n.start()
    assert n.ready.wait(5)
    yield n
    n.close()


@pytest.fixture
def backend(node):
    b = NodeBackend(node.endpoint, timeout_s=2.0)
    yield b
    b.close()


def gen(model: str, rid: str = "r1") -> wire.GenRequest:
    return wire.GenRequest(id=rid, kind="completion", model=model, prompt="hi")


def test_generate_streams_and_skips_replies_to_others(backend):
    items = list(backend.generate(gen("m1")))
    assert items == [wire.Chunk("r1", "a"), wire.Chunk("r1", "b"),
                     wire.Done(id="r1", finish_reason="stop", prompt_tokens=4, completion_tokens=2, node="node-1")]


def test_fail_passes_through(backend):
    [item] = backend.generate(gen("fail"))
    assert isinstance(item, wire.Fail) and item.code == "overloaded" and item.node == "node-1"


def test_silent_node_times_out_and_is_told_to_cancel(node):
    b = NodeBackend(node.endpoint, timeout_s=0.3)
    try:
        t0 = time.monotonic()
        [item] = b.generate(gen("silent", "r9"))
        assert isinstance(item, wire.Fail) and item.code == "timeout"
        assert time.monotonic() - t0 < 2
        assert node.cancel_event.wait(2) and node.cancelled == ["r9"]
    finally:
        b.close()


def test_a_whole_answer_may_be_silent_until_its_deadline(node):
    """The gateway holds a non-streamed answer's chunks: silence is normal until its Done."""
    b = NodeBackend(node.endpoint, timeout_s=0.2)
    try:
        req = wire.GenRequest(id="w1", kind="completion", model="silent", prompt="hi", whole=True, timeout_s=0.5)
        t0 = time.monotonic()
        [item] = b.generate(req)
        took = time.monotonic() - t0
        assert isinstance(item, wire.Fail) and item.code == "timeout" and "0.5 s" in item.message
        assert took >= 0.5  # not cut off by the 0.2 s silence bound of a streamed answer
    finally:
        b.close()


def test_no_node_at_all(tmp_path):
    b = NodeBackend(f"ipc://{tmp_path}/nobody.sock", timeout_s=60, quick_timeout_s=0.2)
    try:
        t0 = time.monotonic()
        [item] = b.generate(gen("m1"))
        assert isinstance(item, wire.Fail) and item.code == "timeout"
        assert time.monotonic() - t0 < 5  # a node that is down fails fast, not after timeout_s
        with pytest.raises(BackendUnavailable):
            b.models()
        b.cancel("r1")  # never blocks, never raises
    finally:
        b.close()


def test_models_are_cached_for_a_while(node):
    b = NodeBackend(node.endpoint, timeout_s=2.0, models_ttl_s=60)
    try:
        assert b.models() == ["m1", "endless"]
        assert b.models() == ["m1", "endless"]
        assert node.models_queries == 1
        b.models_ttl_s = 0
        b.models()
        assert node.models_queries == 2
    finally:
        b.close()


def test_cancel_reaches_the_node(backend, node):
    it = backend.generate(gen("endless", "r5"))
    assert next(it) == wire.Chunk("r5", "x")
    backend.cancel("r5")
    it.close()
    assert node.cancel_event.wait(2) and node.cancelled == ["r5"]
    assert list(backend.generate(gen("m1", "r6")))[-1].id == "r6"  # stray "x"s for r5 are skipped


def test_each_thread_has_its_own_socket(backend, node):
    results: dict[str, list] = {}

    def run(rid: str) -> None:
        results[rid] = list(backend.generate(gen("m1", rid)))

    threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert all(len(results[f"t{i}"]) == 3 for i in range(4))
    assert len({node.peers[f"t{i}"] for i in range(4)}) == 4


# --- the whole HTTP stack under gunicorn ---

def _gunicorn(env_extra: dict[str, str], port: int, conf: str = "services/gunicorn.conf.py") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSWARM_")}
    env.update(ZSWARM_ADDRESS=f"127.0.0.1:{port}", ZSWARM_HTTP_WORKERS="1", ZSWARM_HTTP_THREADS="4", **env_extra)
    return subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", conf,
                             "zswarm.http.wsgi:app_factory()"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_gunicorn_without_endpoint_stops_with_a_clear_error():
    proc = _gunicorn({}, free_port())
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "ZSWARM_NODE_ENDPOINT is not set" in err


def test_gunicorn_end_to_end(node):
    port = free_port()
    proc = _gunicorn({"ZSWARM_NODE_ENDPOINT": node.endpoint, "ZSWARM_API_KEYS": "k1", "ZSWARM_NODE_NAME": "entry"}, port,
                     conf="python:zswarm.http.gunicorn_conf")  # as the node starts it
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0, timeout=10)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "gunicorn did not start listening"
                time.sleep(0.05)
        raw = oa.completions.with_raw_response.create(model="m1", prompt="hi")
        assert raw.headers["x-zswarm-node"] == "node-1"
        assert raw.parse().choices[0].text == "ab"
        parts = list(oa.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}], stream=True))
        assert "".join(p.choices[0].delta.content or "" for p in parts) == "ab"
        with pytest.raises(openai.APIStatusError) as e:
            oa.completions.create(model="fail", prompt="hi")  # not in the model list
        assert e.value.status_code == 404
        # a client that goes away mid-stream: gunicorn's failed write closes the body -> Cancel
        stream = oa.completions.create(model="endless", prompt="hi", stream=True)
        assert next(iter(stream)).choices[0].text == "x"
        stream.close()
        assert node.cancel_event.wait(5), "no Cancel reached the node after the client left"
    finally:
        oa.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        finally:
            proc.kill()
