"""Federated mode end to end: the official openai client, real nodes, the real model."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys

import openai
import pytest

from cluster import REPO, Cluster, free_port, wait_for
from zswarm.engine.model import default_model_path
from zswarm.token import Token

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
SERVER_ARGS = ["--p2p", "--federated", "--threads", "1"]
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def start_federation(tmp, extra_entry=()):
    c = Cluster(tmp, Token.generate().encode())
    s1 = c.node("s1", "server", extra=SERVER_ARGS)
    s2 = c.node("s2", "server", bootstrap=[s1], extra=SERVER_ARGS)
    f = c.node("f", "federated", bootstrap=[s1], extra=list(extra_entry))
    return c, s1, s2, f


def routes_ready(entry, n=2):
    status = entry.admin("status")
    return len([r for r in status["gateway"]["routes"] if MODEL in r["models"]]) == n


def api_url(node):
    return f"http://{node.args[node.args.index('--address') + 1]}"


def client(node, key="none"):
    return openai.OpenAI(base_url=api_url(node) + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    c, s1, s2, f = start_federation(tmp_path_factory.mktemp("fed"))
    try:
        wait_for(lambda: routes_ready(f), 60, 0.2, what="both servers routable from the entry point")
        yield c, s1, s2, f
    finally:
        c.close()


@pytest.fixture(scope="module")
def reference():
    from llama_cpp import Llama

    llm = Llama(model_path=default_model_path(), n_ctx=2048, n_threads=1, verbose=False)
    return llm.create_chat_completion(messages=MESSAGES, temperature=0, max_tokens=24)["choices"][0]["message"]["content"]


def test_openai_client_plain_and_streamed_equal_llama_cpp(fed, reference):
    _, _, _, f = fed
    api = client(f)
    assert [m.id for m in api.models.list().data] == [MODEL]
    plain = api.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24)
    body = plain.parse()
    assert body.choices[0].message.content == reference
    assert body.usage.completion_tokens > 0 and body.usage.prompt_tokens > 0
    assert plain.headers["x-zswarm-node"] in {s.node_id() for s in fed[1:3]}
    stream = api.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == reference


def test_forty_concurrent_requests_are_spread(fed):
    _, s1, s2, f = fed
    api = client(f)

    def one(i):
        r = api.completions.with_raw_response.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=4)
        r.parse()
        return r.headers["x-zswarm-node"]

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        served = list(pool.map(one, range(40)))
    counts = {n: served.count(n) for n in (s1.node_id(), s2.node_id())}
    assert sum(counts.values()) == 40
    assert min(counts.values()) >= 40 / 3, counts


def test_errors_are_openai_shaped_and_never_500(fed):
    _, _, _, f = fed
    api = client(f)
    with pytest.raises(openai.NotFoundError) as e:
        api.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
    import http.client

    host, port = api_url(f)[len("http://"):].split(":")

    def post(body, headers=None):
        # a raw socket: the server may answer 413 and close before a huge body is all sent,
        # and the answer must still be read
        with socket.create_connection((host, int(port)), timeout=30) as sk:
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            try:
                sk.sendall(head + body)
            except (BrokenPipeError, ConnectionResetError):
                pass
            data = b""
            try:
                while chunk := sk.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass  # what was read before the reset holds the answer
        r = http.client.HTTPResponse(FakeSock(data))
        r.begin()
        return r.status, json.loads(r.read() or b"{}")

    status, body = post(b"{not json")
    assert status == 400 and set(body["error"]) >= {"message", "type", "param", "code"}
    cases = [
        json.dumps({"model": MODEL, "messages": "hello"}).encode(),
        json.dumps({"model": 5, "messages": MESSAGES}).encode(),
        json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": "many"}).encode(),
        b"[" * 100000 + b"]" * 100000,
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 3_000_000}]}).encode(),
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 5000}]}).encode(),
        # just under the API's body limit: crosses every hop (above the transport's 1 MiB default
        # cap once encoded with its envelope) and is refused by the engine as too long
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 340_000}]}).encode(),
    ]
    for body_bytes in cases:
        status, body = post(body_bytes)
        assert 400 <= status < 500, (status, body)
        assert "error" in body


class FakeSock:
    def __init__(self, data):
        self.data = data

    def makefile(self, *a, **k):
        import io

        return io.BytesIO(self.data)


def test_client_disconnect_cancels_on_the_serving_node(fed):
    _, s1, s2, f = fed
    before = {s.name: s.admin("status")["counters"].get("requests_cancelled", 0) for s in (s1, s2)}
    host, port = api_url(f)[len("http://"):].split(":")
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "stream": True,
                       "temperature": 1.0}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n".encode() + b"Content-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data: {" not in got:
            chunk = s.recv(4096)
            assert chunk, got  # closed before the first chunk: the answer says why
            got += chunk
    wait_for(lambda: sum(s.admin("status")["counters"].get("requests_cancelled", 0) for s in (s1, s2))
             > sum(before.values()), 15, 0.1, what="the serving node to see the cancel")


def test_gunicorn_on_its_own_serves_the_same_api(fed, tmp_path):
    _, s1, _, _ = fed
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "ZSWARM_NODE_ENDPOINT": f"ipc://{s1.state_dir / 'gateway.sock'}",
           "ZSWARM_ADDRESS": f"127.0.0.1:{port}"}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(REPO / "services" / "gunicorn.conf.py"),
                             "zswarm.http.wsgi:app_factory()"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        def answers():
            try:
                return api.models.list().data
            except openai.APIConnectionError:
                return None
        wait_for(answers, 30, 0.2, what="gunicorn to answer")
        out = api.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=8)
        assert out.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(15)


def test_api_keys_are_enforced(tmp_path):
    c = Cluster(tmp_path, "")
    try:
        s = c.node("solo", "server", extra=["--threads", "1", "--api-key", "k1,k2"])
        wait_for(lambda: s.admin("status")["gateway"]["routes"], 60, 0.2, what="the engine")
        with pytest.raises(openai.AuthenticationError):
            client(s, key="wrong").models.list()
        assert client(s, key="k2").models.list().data[0].id == MODEL
    finally:
        c.close()


def test_sigkill_under_load_loses_no_unstarted_request(tmp_path):
    c, s1, s2, f = start_federation(tmp_path)
    try:
        wait_for(lambda: routes_ready(f), 60, 0.2, what="both servers routable")
        api = client(f)

        def one(i):
            started = False
            try:
                text = ""
                for ch in api.chat.completions.create(model=MODEL, stream=True, max_tokens=24,
                                                      messages=[{"role": "user", "content": f"Tell me about {i}."}]):
                    if ch.choices and ch.choices[0].delta.content:
                        started = True
                        text += ch.choices[0].delta.content
                return ("ok", text)
            except openai.APIError as e:
                return ("started" if started else "lost", repr(e))

        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            futures = [pool.submit(one, i) for i in range(40)]
            wait_for(lambda: all(s.admin("status")["gateway"]["in_flight"] > 0 for s in (s1, s2)), 30, 0.05,
                     what="load on both servers")
            s1.signal(signal.SIGKILL)
            results = [fu.result(timeout=300) for fu in futures]
        lost = [r for r in results if r[0] == "lost"]
        assert not lost, lost
        assert sum(r[0] == "ok" for r in results) >= 20
        out = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert out.choices[0].message.content is not None
    finally:
        c.close()


def test_a_reshard_on_a_server_does_not_make_the_entry_point_answer_404(tmp_path):
    """A planned engine restart keeps the server's model announced: requests routed to it wait
    for the engine instead of finding no route (seen: a worker joining a --p2p --federated server
    made the entry point answer 404 model_not_found for the second the engine reloaded)."""
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        s = c.node("s", "server", extra=SERVER_ARGS)
        f = c.node("f", "federated", bootstrap=[s])
        wait_for(lambda: routes_ready(f, 1), 60, 0.2, what="the server routable from the entry point")
        api = client(f)
        pid_before = s.admin("status")["children"]["engine"]["pid"]
        statuses, errors = [], []

        def ask() -> None:
            try:
                api.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=4)
                statuses.append(200)
            except openai.APIStatusError as e:
                statuses.append(e.status_code)
                errors.append(str(e))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask) for _ in range(4)]
            s.admin("reshard")
            futures += [pool.submit(ask) for _ in range(12)]
            concurrent.futures.wait(futures, timeout=120)
        assert s.admin("status")["children"]["engine"]["pid"] != pid_before, "the engine did not restart"
        assert statuses and all(code == 200 for code in statuses), errors
        assert "routes: none" not in f.log(), "the entry point lost its only route during the restart"
    finally:
        c.close()
