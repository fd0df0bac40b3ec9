"""The OpenAI-compatible HTTP app against a scripted backend (the app owns no socket, so a test
double stands in for the node), plus the real ``openai`` client against a real WSGI server."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import falcon
import falcon.testing
import openai
import pytest

from swarm_fakes import FakeBackend, serve_wsgi
from zswarm import wire
from zswarm.http import create_app

Step = Callable[[str], object]  # request id -> the reply to yield


def chunk(text: str) -> Step:
    return lambda rid: wire.Chunk(rid, text)


def done(finish_reason: str = "stop", prompt_tokens: int = 3, completion_tokens: int = 2, node: str = "node-b") -> Step:
    return lambda rid: wire.Done(id=rid, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                                 completion_tokens=completion_tokens, node=node)


def fail(code: str, message: str = "it failed", node: str = "node-b") -> Step:
    return lambda rid: wire.Fail(id=rid, code=code, message=message, node=node)


def boom(rid: str) -> object:
    raise RuntimeError("secret internal detail")


HELLO = [chunk("Hel"), chunk("lo"), done()]


class ScriptedBackend(FakeBackend):
    """Yields its script for every request; records requests, cancels and closed iterators."""

    def __init__(self, script: list[Step] = HELLO, models: list[str] | None = None, endless: bool = False,
                 down: bool = False):
        super().__init__(["m1", "m2"] if models is None else models, down=down)
        self.script = script
        self.endless = endless
        self.requests: list[wire.GenRequest] = []
        self.closed: list[str] = []
        self.cancel_event = threading.Event()

    def generate(self, req: wire.GenRequest) -> Iterator[object]:
        self.requests.append(req)
        try:
            for step in self.script:
                yield step(req.id)
            deadline = time.monotonic() + 10
            while self.endless and time.monotonic() < deadline:
                if self.cancel_event.wait(0.005):  # paces the tokens; ends when cancelled
                    return
                yield wire.Chunk(req.id, "x")
        finally:
            self.closed.append(req.id)

    def cancel(self, request_id: str) -> None:
        super().cancel(request_id)
        self.cancel_event.set()


def client(backend: ScriptedBackend, **kw) -> falcon.testing.TestClient:
    kw.setdefault("node_name", "node-a")
    return falcon.testing.TestClient(create_app(backend, **kw))


CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m1", "prompt": "Once upon"}


def sse_events(raw: bytes) -> list[object]:
    """Parse an event stream as a client does: events end at a blank line, data lines join."""
    events = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
        if data:
            text = "\n".join(data)
            events.append(text if text == "[DONE]" else json.loads(text))
    return events


def assert_error(result, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert result.status_code == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    err = result.json["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_the_http_package_never_imports_pykka():
    code = "import sys, zswarm.http.wsgi; assert 'pykka' not in sys.modules, 'pykka imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- models, health, routing ---

def test_models_list_and_one():
    c = client(ScriptedBackend())
    r = c.simulate_get("/v1/models")
    assert r.status_code == 200
    assert r.json == {"object": "list", "data": [
        {"id": "m1", "object": "model", "created": 0, "owned_by": "zswarm"},
        {"id": "m2", "object": "model", "created": 0, "owned_by": "zswarm"}]}
    assert r.headers["x-zswarm-node"] == "node-a"
    assert c.simulate_get("/v1/models/m2").json["id"] == "m2"
    assert_error(c.simulate_get("/v1/models/nope"), 404, code="model_not_found")


def test_node_unavailable_is_503():
    c = client(ScriptedBackend(down=True))
    assert_error(c.simulate_get("/v1/models"), 503, code="node_unavailable")
    assert_error(c.simulate_post("/v1/chat/completions", json=CHAT), 503, code="node_unavailable")


def test_healthz():
    r = client(ScriptedBackend()).simulate_get("/healthz")
    assert r.status_code == 200 and r.json == {"status": "ok"}


def test_unknown_route_and_wrong_method_are_openai_shaped():
    c = client(ScriptedBackend())
    r = c.simulate_get("/v1/nothing")
    assert_error(r, 404)
    assert r.headers["x-zswarm-node"] == "node-a"
    r = c.simulate_get("/v1/chat/completions")
    assert_error(r, 405)
    assert "POST" in r.headers["allow"]
    assert_error(c.simulate_delete("/v1/models"), 405)


# --- non-streaming ---

def test_chat_completion_whole():
    backend = ScriptedBackend()
    r = client(backend).simulate_post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "m1" and isinstance(body["created"], int)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert r.headers["x-zswarm-node"] == "node-b"  # the node that answered, not the entry node
    assert backend.cancelled == [] and backend.closed == [backend.requests[0].id]


def test_text_completion_whole():
    r = client(ScriptedBackend(script=[chunk("a"), chunk(" time"), done("length", node="")])).simulate_post(
        "/v1/completions", json={**COMPLETION, "prompt": ["Once upon"]})
    assert r.status_code == 200
    body = r.json
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "a time" and body["choices"][0]["finish_reason"] == "length"
    assert r.headers["x-zswarm-node"] == "node-a"  # Done without a node: the entry node


def test_request_translation():
    backend = ScriptedBackend()
    c = client(backend)
    r = c.simulate_post("/v1/chat/completions", json={
        "model": "m1", "user": "ignored", "logprobs": False, "frequency_penalty": 0.5, "tools": [],
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                     {"role": "assistant", "content": None}],
        "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "stop": "\n", "seed": 42, "n": 1})
    assert r.status_code == 200, r.text
    req = backend.requests[-1]
    assert req.kind == "chat" and req.model == "m1" and len(req.id) == 32
    assert [(m.role, m.content, m.name) for m in req.messages] == [
        ("system", "be brief", None), ("user", "a\nb", "ann"), ("assistant", "", None)]
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.seed) == (7, 0.0, 0.5, ["\n"], 42)
    c.simulate_post("/v1/completions", json={**COMPLETION, "stop": ["a", "b"], "temperature": None})
    req = backend.requests[-1]
    assert (req.kind, req.prompt, req.stop, req.temperature, req.max_tokens) == ("completion", "Once upon", ["a", "b"], 1.0, None)


def test_options_not_served_yet_are_a_400_naming_them():
    backend = ScriptedBackend()
    c = client(backend)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for body, param in (({"tools": [tool]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
                        ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
                        ({"echo": True}, "echo"), ({"functions": [{"name": "f"}]}, "functions"),
                        ({"response_format": {"type": "xml"}}, "response_format.type")):
        r = c.simulate_post("/v1/chat/completions", json={**CHAT, **body})
        assert r.status_code == 400 and r.json["error"]["param"] == param, (body, r.text)
    for body, param in (({"logprobs": 2}, "logprobs"), ({"suffix": "end"}, "suffix"), ({"echo": True}, "echo")):
        r = c.simulate_post("/v1/completions", json={**COMPLETION, **body})
        assert r.status_code == 400 and r.json["error"]["param"] == param, (body, r.text)
    # what "not asked for" looks like passes
    r = c.simulate_post("/v1/chat/completions", json={**CHAT, "tools": [], "tool_choice": "none", "logprobs": None,
                                                      "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text
    assert len(backend.requests) == 1 and not backend.requests[-1].json_output


def test_response_format_asks_the_engine_for_json():
    backend = ScriptedBackend()
    c = client(backend)
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    c.simulate_post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "json_object"}})
    assert (backend.requests[-1].json_output, backend.requests[-1].json_schema) == (True, "")
    c.simulate_post("/v1/chat/completions", json={**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}})
    req = backend.requests[-1]
    assert req.json_output and json.loads(req.json_schema) == schema
    r = c.simulate_post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "json_schema"}})
    assert r.status_code == 400 and r.json["error"]["param"] == "response_format.json_schema"


# --- streaming ---

def test_chat_stream_format():
    r = client(ScriptedBackend()).simulate_post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache"
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({e["id"] for e in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in chunks) == "Hello"
    assert [e["choices"][0]["finish_reason"] for e in chunks] == [None, None, None, "stop"]
    assert not any("usage" in e for e in chunks)


def test_stream_include_usage():
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(client(ScriptedBackend()).simulate_post("/v1/chat/completions", json=body).content)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


def test_completion_stream_format():
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(client(ScriptedBackend()).simulate_post("/v1/completions", json=body).content)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(e["object"] == "text_completion" and e["id"].startswith("cmpl-") for e in chunks)
    assert "".join(e["choices"][0]["text"] for e in chunks) == "Hello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["usage"]["total_tokens"] == 5


def test_stream_that_ends_at_once():
    events = sse_events(client(ScriptedBackend(script=[done()])).simulate_post(
        "/v1/chat/completions", json={**CHAT, "stream": True}).content)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"


def test_stream_names_node_when_the_first_reply_does():
    r = client(ScriptedBackend(script=[done(node="node-c")])).simulate_post(
        "/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.headers["x-zswarm-node"] == "node-c"
    r = client(ScriptedBackend()).simulate_post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.headers["x-zswarm-node"] == "node-a"  # a Chunk names no node (yet)


# --- failures from the node ---

@pytest.mark.parametrize("code", sorted(wire.FAIL_CODES))
@pytest.mark.parametrize("stream", [False, True])
def test_fail_before_anything_is_an_http_error(code, stream):
    backend = ScriptedBackend(script=[fail(code, "nope", node="node-z")])
    r = client(backend).simulate_post("/v1/chat/completions", json={**CHAT, "stream": stream})
    err = assert_error(r, wire.FAIL_CODES[code], code=code)
    assert err["message"] == "nope"
    assert r.headers["x-zswarm-node"] == "node-z"
    assert backend.cancelled == []  # a Fail ends the request; nothing to cancel


def test_client_closed_status_line():
    r = client(ScriptedBackend(script=[fail("cancelled")])).simulate_post("/v1/completions", json=COMPLETION)
    assert r.status == "499 Client Closed Request"


def test_unknown_fail_code_is_500():
    assert_error(client(ScriptedBackend(script=[fail("weird")])).simulate_post("/v1/completions", json=COMPLETION), 500)


def test_fail_after_streaming_began_is_an_sse_error():
    backend = ScriptedBackend(script=[chunk("Hel"), fail("engine_down", "engine died", node="node-z")])
    r = client(backend).simulate_post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    assert events[-2] == {"error": {"message": "engine died", "type": "server_error", "param": None, "code": "engine_down"}}
    assert events[1]["choices"][0]["delta"]["content"] == "Hel"


def test_fail_midway_without_stream_is_an_http_error():
    backend = ScriptedBackend(script=[chunk("Hel"), fail("context_length", node="node-z")])
    r = client(backend).simulate_post("/v1/completions", json=COMPLETION)
    assert_error(r, 400, code="context_length")
    assert r.headers["x-zswarm-node"] == "node-z"


def test_backend_that_ends_without_a_result():
    backend = ScriptedBackend(script=[chunk("a")])
    assert_error(client(backend).simulate_post("/v1/completions", json=COMPLETION), 500, code="internal")
    events = sse_events(client(backend).simulate_post("/v1/completions", json={**COMPLETION, "stream": True}).content)
    assert events[-2]["error"]["code"] == "internal" and events[-1] == "[DONE]"


def test_backend_exception_is_a_bare_500(caplog):
    backend = ScriptedBackend(script=[chunk("a"), boom])
    with caplog.at_level(logging.ERROR):
        r = client(backend).simulate_post("/v1/chat/completions", json=CHAT)
    err = assert_error(r, 500, code="internal")
    assert "secret" not in r.text and "Traceback" not in r.text
    assert "secret internal detail" in caplog.text  # the detail is in the log only
    assert r.headers["x-zswarm-node"] == "node-a"
    assert backend.cancelled == [backend.requests[0].id]  # the node is told to stop
    assert err["message"]


def test_backend_exception_midstream(caplog):
    backend = ScriptedBackend(script=[chunk("a"), boom])
    with caplog.at_level(logging.ERROR):
        r = client(backend).simulate_post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200 and "secret" not in r.text
    events = sse_events(r.content)
    assert events[-2]["error"]["code"] == "internal" and events[-1] == "[DONE]"
    assert backend.cancelled == [backend.requests[0].id]


def test_backend_exception_on_first_reply():
    backend = ScriptedBackend(script=[boom])
    assert_error(client(backend).simulate_post("/v1/chat/completions", json={**CHAT, "stream": True}), 500)
    assert backend.cancelled == [backend.requests[0].id]


# --- client disconnect ---

def _start_wsgi(app, body: dict):
    env = falcon.testing.create_environ(method="POST", path="/v1/chat/completions",
                                        body=json.dumps(body), headers={"Content-Type": "application/json"})
    started = {}

    def start_response(status, headers, exc_info=None):
        started["status"], started["headers"] = status, dict(headers)

    return started, app(env, start_response)


def test_close_mid_stream_cancels():
    backend = ScriptedBackend(script=[chunk("a"), chunk("b"), chunk("c"), done()])
    started, body = _start_wsgi(create_app(backend), {**CHAT, "stream": True})
    assert started["status"].startswith("200")
    it = iter(body)
    next(it), next(it)  # the role chunk and "a"
    body.close()  # what the WSGI server does when a write to the client fails
    rid = backend.requests[0].id
    assert backend.cancelled == [rid] and backend.closed == [rid]


def test_close_before_first_read_cancels():
    backend = ScriptedBackend()
    _, body = _start_wsgi(create_app(backend), {**CHAT, "stream": True})
    body.close()
    assert backend.cancelled == [backend.requests[0].id]


def test_stream_read_to_the_end_does_not_cancel():
    backend = ScriptedBackend()
    _, body = _start_wsgi(create_app(backend), {**CHAT, "stream": True})
    assert list(body)[-1] == b"data: [DONE]\n\n"
    body.close()
    assert backend.cancelled == []


# --- bad requests never give a 500 ---

@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("body", [
    b"", b"{", b"null", b"[]", b"42", b'"x"', b"\xff\xfe", b'{"model": "m1", "messages": [}',
    b'{"model": "m1", "prompt": "\\ud800", "messages": "\\ud800"}',
    b'{"model": "\xff", "prompt": "x", "messages": []}',
    b'{"model": "m1", "prompt": "\xed\xa0\x80", "messages": [{"role": "user", "content": "\xc3"}]}',
    b"[" * 100_000, b"{\"a\":" * 100_000,
    b'{"model": "m1", "prompt": "x", "messages": [], "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"model": "m1", "prompt": "x", "messages": [], "extra": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    b'{"model": "m1", "seed": 1' + b"0" * 5000 + b"}",
    b'{"model": 1e999}', b'{"model": NaN}',
])
def test_malformed_bodies_are_400(path, body):
    r = client(ScriptedBackend()).simulate_post(path, body=body)
    assert_error(r, 400)


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": 3, "messages": []}, "model"),
    ({"model": "m1"}, "messages"),
    ({"model": "m1", "messages": []}, "messages"),
    ({"model": "m1", "messages": [{"content": "x"}]}, "messages[0].role"),
    ({"model": "m1", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m1", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type"),
    ({**CHAT, "max_tokens": "5"}, "max_tokens"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
    ({**CHAT, "temperature": 3}, "temperature"),
    ({**CHAT, "top_p": "high"}, "top_p"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "stop": [5]}, "stop[0]"),
    ({**CHAT, "seed": 1.5}, "seed"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({**CHAT, "n": 2}, "n"),
])
def test_invalid_chat_fields_name_the_param(body, param):
    backend = ScriptedBackend()
    assert_error(client(backend).simulate_post("/v1/chat/completions", json=body), 400, param=param)
    assert backend.requests == []


@pytest.mark.parametrize("body, param", [
    ({"model": "m1"}, "prompt"),
    ({"model": "m1", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m1", "prompt": []}, "prompt"),
    ({"model": "m1", "prompt": [1, 2]}, "prompt[0]"),
])
def test_invalid_completion_fields_name_the_param(body, param):
    assert_error(client(ScriptedBackend()).simulate_post("/v1/completions", json=body), 400, param=param)


def test_unknown_model_is_404():
    backend = ScriptedBackend()
    r = client(backend).simulate_post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
    assert_error(r, 404, param="model", code="model_not_found")
    assert r.headers["x-zswarm-node"] == "node-a"
    assert backend.requests == []


def test_body_too_large_is_413():
    c = client(ScriptedBackend())
    assert_error(c.simulate_post("/v1/chat/completions", body=b"x" * ((1 << 20) + 1)), 413)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    c = client(ScriptedBackend(), max_body_bytes=1000)
    assert_error(c.simulate_post("/v1/chat/completions", json=big), 413)
    assert c.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200


def test_body_without_length_from_a_server_that_ends_input():
    """gunicorn passes chunked uploads with no Content-Length and wsgi.input_terminated."""
    app = create_app(ScriptedBackend(), max_body_bytes=1000)
    for body, status in ((json.dumps(CHAT).encode(), "200"), (b" " * 2000, "413")):
        env = falcon.testing.create_environ(method="POST", path="/v1/chat/completions", body=body)
        del env["CONTENT_LENGTH"]
        env["wsgi.input_terminated"] = True
        seen = []
        b"".join(app(env, lambda s, h, e=None: seen.append(s)))
        assert seen[0].startswith(status)


# --- API keys ---

def test_api_keys():
    c = client(ScriptedBackend(), api_keys=["k1", "k2"])
    r = c.simulate_get("/v1/models")
    assert_error(r, 401, code="invalid_api_key")
    assert r.headers["x-zswarm-node"] == "node-a"
    assert_error(c.simulate_get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert_error(c.simulate_get("/v1/models", headers={"Authorization": "Basic k1"}), 401)
    assert_error(c.simulate_post("/v1/chat/completions", json=CHAT), 401)
    assert_error(c.simulate_get("/v1/nothing"), 401)  # nothing is revealed without a key
    assert c.simulate_get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert c.simulate_get("/v1/models", headers={"authorization": "bearer k1"}).status_code == 200
    assert c.simulate_get("/v1/models", headers={"x-api-key": "k1"}).status_code == 200
    assert c.simulate_post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k1"}).status_code == 200
    assert c.simulate_get("/healthz").status_code == 200


def test_no_keys_configured_means_open():
    assert client(ScriptedBackend(), api_keys=["", ""]).simulate_get("/v1/models").status_code == 200


# --- a real server and the real openai client ---

@pytest.fixture
def serve():
    """``serve(app)`` serves ``app`` on 127.0.0.1 in a thread until the test ends; returns host:port."""
    with contextlib.ExitStack() as servers:
        yield lambda app: servers.enter_context(serve_wsgi(app)).removeprefix("http://")


def test_openai_client(serve):
    backend = ScriptedBackend()
    addr = serve(create_app(backend, api_keys=["sekrit"], node_name="node-a"))
    oa = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="sekrit", max_retries=0, timeout=10)
    try:
        messages = [{"role": "user", "content": "hi"}]
        reply = oa.chat.completions.create(model="m1", messages=messages)
        assert reply.choices[0].message.content == "Hello"
        assert reply.usage.total_tokens == 5
        stream = oa.chat.completions.create(model="m1", messages=messages, stream=True,
                                            stream_options={"include_usage": True})
        parts = list(stream)
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == "Hello"
        assert parts[-1].usage.completion_tokens == 2
        assert oa.completions.create(model="m1", prompt="x").choices[0].text == "Hello"
        assert [m.id for m in oa.models.list()] == ["m1", "m2"]
        with pytest.raises(openai.NotFoundError) as e:
            oa.chat.completions.create(model="nope", messages=messages)
        assert e.value.code == "model_not_found"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://{addr}/v1", api_key="wrong", max_retries=0).models.list()
        backend.script = [chunk("Hel"), fail("engine_down", "engine died")]
        with pytest.raises(openai.APIError, match="engine died"):
            list(oa.chat.completions.create(model="m1", messages=messages, stream=True))
    finally:
        oa.close()


def test_disconnect_through_a_real_server_cancels(serve):
    backend = ScriptedBackend(script=[chunk("a")], endless=True)
    host, port = serve(create_app(backend)).split(":")
    body = json.dumps({**CHAT, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head = b""
        while b"data: " not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    # the client went away mid-stream; the server's next writes fail and it closes the body
    assert backend.cancel_event.wait(5), "the server's close() of the body did not cancel the request"
    assert backend.cancelled == [backend.requests[0].id]
