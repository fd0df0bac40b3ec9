"""The engine child process, driven over its real ipc socket with a DEALER.

Answers are compared with llama_cpp.Llama run in this process on the same model: the engine
must add nothing and lose nothing (text, finish reason, usage). Engines run with --threads 1
and a small context so the suite stays quick on two shared cores.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import msgspec
import pytest
import zmq

from zswarm import wire
from zswarm.engine.model import default_model_path, model_name

REPO = Path(__file__).resolve().parent.parent
CTX = 512
WAIT_S = 60.0  # per reply stream; generous because the machine is shared


# --- unit: names (no model loaded) ---

def test_model_name_is_the_file_stem_without_quantization():
    assert model_name("/m/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct"
    assert model_name("Llama-3.2-1B-Instruct-Q4_K_M.gguf") == "llama-3.2-1b-instruct"
    assert model_name("mistral-7b-v0.2.IQ3_XS.gguf") == "mistral-7b-v0.2"
    assert model_name("phi-2.f16.gguf") == "phi-2"
    assert model_name("tiny.gguf") == "tiny"


def test_default_model_path_is_the_packaged_smollm2():
    path = default_model_path()
    assert os.path.isfile(path) and path.endswith(".gguf")
    assert model_name(path) == "smollm2-135m-instruct"


# --- helpers ---

def read_lines(proc: subprocess.Popen, timeout_s: float, read_log: Callable[[], str]) -> list[str]:
    """A child's stdout lines up to and including the first that starts with READY."""
    deadline = time.monotonic() + timeout_s
    buf = b""
    fd = proc.stdout.fileno()
    while not any(line.startswith(b"READY") for line in buf.split(b"\n")[:-1]):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no READY within {timeout_s} s; log:\n{read_log()}")
        if select.select([fd], [], [], left)[0]:
            data = os.read(fd, 4096)
            if not data:
                raise AssertionError(f"exited ({proc.wait(5)}) before READY; log:\n{read_log()}")
            buf += data
    lines = [line.decode() for line in buf.split(b"\n")[:-1]]
    return lines[:next(i for i, line in enumerate(lines) if line.startswith("READY")) + 1]


class ChildProc:
    """A child with its handshake on a stdout pipe and its stderr in ``log_path``; ``close()``
    stops it and fails if it ignores SIGTERM, or with ``clean_exit`` if it then exits non-zero."""

    what = "child"
    clean_exit = False

    def _spawn(self, cmd: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self.log)

    def read_log(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    code = self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
                    raise AssertionError(f"{self.what} ignored SIGTERM; log:\n{self.read_log()}")
                assert code == 0 or not self.clean_exit, f"{self.what} did not stop cleanly; log:\n{self.read_log()}"
        finally:
            self.proc.stdout.close()
            self.log.close()


class EngineProc(ChildProc):
    """One engine child; ``close()`` stops it and fails if it will not die."""

    what = "engine"

    def __init__(self, tmp: Path, *args: str, parallel: int = 1):
        self.sock_path = tmp / "engine.sock"
        self.endpoint = f"ipc://{self.sock_path}"
        self._spawn([sys.executable, "-m", "zswarm.engine.proc", "--endpoint", self.endpoint,
                     "--ctx-size", str(CTX), "--threads", "1", "--parallel", str(parallel),
                     "--node-id", "n-test", *args], tmp / "engine.log")
        try:
            self.name = self._wait_ready(60.0)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> str:
        """The model name from READY; the handshake lines before it may only be STAGE and LAYERS."""
        self.handshake = read_lines(self.proc, timeout_s, self.read_log)
        assert all(line.split(" ", 1)[0] in ("STAGE", "LAYERS") for line in self.handshake[:-1]), self.handshake
        assert self.handshake[:2] == ["STAGE loading", "STAGE proving"], self.handshake
        return self.handshake[-1].split(" ", 1)[1]


class Client:
    """A DEALER talking to one engine; replies are matched to requests by id."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.inbox: dict[str, list] = {}
        self.arrivals: list[tuple[str, str]] = []  # (request id, message type) in arrival order

    def send(self, body) -> None:
        self.sock.send(wire.encode_inference("test", body))

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def request(self, **fields) -> str:
        rid = fields.pop("id", None) or uuid.uuid4().hex
        fields.setdefault("model", "smollm2-135m-instruct")
        self.send(wire.GenRequest(id=rid, **fields))
        return rid

    def next(self, rid: str, timeout_s: float = WAIT_S):
        """The next message for ``rid``."""
        deadline = time.monotonic() + timeout_s
        while not self.inbox.get(rid):
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise AssertionError(f"no reply for {rid} within {timeout_s} s")
            body = wire.decode_inference(self.sock.recv()).body
            self.inbox.setdefault(body.id, []).append(body)
            self.arrivals.append((body.id, type(body).__name__))
        return self.inbox[rid].pop(0)

    def collect(self, rid: str, timeout_s: float = WAIT_S) -> tuple[list[str], object]:
        """Every Chunk's text, and the Done or Fail that ends the stream."""
        chunks = []
        while True:
            msg = self.next(rid, timeout_s)
            if isinstance(msg, wire.Chunk):
                chunks.append(msg.text)
            else:
                return chunks, msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = EngineProc(tmp_path_factory.mktemp("engine"), parallel=2)
    yield e
    e.close()


@pytest.fixture
def client(zctx, engine):
    c = Client(zctx, engine.endpoint)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference():
    """The same model in this process, as llama-cpp-python serves it without zswarm."""
    import llama_cpp
    return llama_cpp.Llama(default_model_path(), n_ctx=CTX, n_threads=1, verbose=False)


CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
COUNT_PROMPT = "1, 2, 3, 4, 5, 6,"  # greedy decoding keeps counting: never stops by itself


# --- slow: a real engine ---

@pytest.mark.slow
def test_ready_names_the_model(engine):
    assert engine.name == "smollm2-135m-instruct"


@pytest.mark.slow
@pytest.mark.parametrize("temperature, seed", [(0.0, 1), (0.8, 7)], ids=["greedy", "seeded"])
def test_chat_matches_in_process_llama(client, reference, temperature, seed):
    ref = reference.create_chat_completion(messages=CHAT, temperature=temperature, top_p=1.0,
                                           max_tokens=24, seed=seed)
    rid = client.request(kind="chat", messages=[wire.ChatMessage(**m) for m in CHAT],
                         temperature=temperature, top_p=1.0, max_tokens=24, seed=seed)
    chunks, end = client.collect(rid)
    assert isinstance(end, wire.Done), end
    assert "".join(chunks) == ref["choices"][0]["message"]["content"]
    assert end.finish_reason == ref["choices"][0]["finish_reason"]
    assert (end.prompt_tokens, end.completion_tokens) == (ref["usage"]["prompt_tokens"],
                                                          ref["usage"]["completion_tokens"])
    assert end.node == "n-test"


@pytest.mark.slow
@pytest.mark.parametrize("prompt, stop", [("The three primary colors are", []),
                                          (COUNT_PROMPT, [" 9,"])], ids=["plain", "stop"])
def test_completion_matches_in_process_llama(client, reference, prompt, stop):
    ref = reference.create_completion(prompt, temperature=0.0, top_p=1.0, max_tokens=16, stop=stop, seed=3)
    rid = client.request(kind="completion", prompt=prompt, temperature=0.0, top_p=1.0, max_tokens=16,
                         stop=stop, seed=3)
    chunks, end = client.collect(rid)
    assert isinstance(end, wire.Done), end
    assert "".join(chunks) == ref["choices"][0]["text"]
    assert end.finish_reason == ref["choices"][0]["finish_reason"]
    assert (end.prompt_tokens, end.completion_tokens) == (ref["usage"]["prompt_tokens"],
                                                          ref["usage"]["completion_tokens"])
    if stop:
        assert end.finish_reason == "stop" and end.completion_tokens < 16


@pytest.mark.slow
def test_a_conversation_finds_its_prefix_in_the_prompt_cache_after_another(client, reference):
    """A, then B, then A's next turn: the engine gets A's state back from its prompt cache
    (whichever of its two slots takes it), evaluates only the new part, and answers exactly as
    llama.cpp does from scratch."""
    def chat(system, *turns):
        return [wire.ChatMessage(role="system", content=system)] + [
            wire.ChatMessage(role=r, content=t) for r, t in zip(["user", "assistant"] * len(turns), turns)]
    sys_a, sys_b = "You answer questions about ships. " * 30, "You answer questions about bread. " * 30
    first = chat(sys_a, "What is a keel?")
    rid = client.request(kind="chat", messages=first, temperature=0.0, max_tokens=8)
    text_a, end = client.collect(rid)
    assert end.cached_tokens < 10 and end.prompt_s > 0 and end.gen_s > 0  # the chat template's first tokens at most
    for other in (sys_b, sys_b.replace("bread", "cheese")):  # other conversations, on both slots
        _, end_b = client.collect(client.request(kind="chat", messages=chat(other, "Why?"), temperature=0.0,
                                                 max_tokens=8))
        assert end_b.cached_tokens < end.prompt_tokens / 2
    second = chat(sys_a, "What is a keel?", "".join(text_a), "And a mast?")
    chunks, end2 = client.collect(client.request(kind="chat", messages=second, temperature=0.0, max_tokens=12))
    assert end.prompt_tokens - 2 <= end2.cached_tokens < end2.prompt_tokens, (end, end2)
    reference.reset()  # from scratch: nothing of this conversation in its cache
    ref = reference.create_chat_completion(messages=[{"role": m.role, "content": m.content} for m in second],
                                           temperature=0.0, max_tokens=12)
    assert "".join(chunks) == ref["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_two_requests_run_at_once_on_two_slots(client, reference):
    ref = reference.create_completion(COUNT_PROMPT, temperature=0.0, max_tokens=20)["choices"][0]["text"]
    a = client.request(kind="completion", prompt=COUNT_PROMPT, temperature=0.0, max_tokens=20)
    b = client.request(kind="completion", prompt=COUNT_PROMPT, temperature=0.0, max_tokens=20)
    chunks_a, end_a = client.collect(a)
    chunks_b, end_b = client.collect(b)
    assert isinstance(end_a, wire.Done) and isinstance(end_b, wire.Done)
    assert "".join(chunks_a) == ref and "".join(chunks_b) == ref
    # Both ran at once: each streamed its first piece before the other finished.
    order = client.arrivals
    for me, other in ((a, b), (b, a)):
        assert order.index((me, "Chunk")) < order.index((other, "Done")), order


@pytest.mark.slow
def test_cancel_stops_generation_and_the_slot_serves_again(client):
    rid = client.request(kind="completion", prompt=COUNT_PROMPT, temperature=0.0, max_tokens=400)
    for _ in range(3):
        assert isinstance(client.next(rid), wire.Chunk)
    client.send(wire.Cancel(rid))
    chunks, end = client.collect(rid, timeout_s=10)
    assert isinstance(end, wire.Fail) and end.code == "cancelled" and end.started, end
    assert len(chunks) < 100  # a few tokens were in flight, not the 400 asked for

    chunks, end = client.collect(client.request(kind="completion", prompt="Hello", max_tokens=4))
    assert isinstance(end, wire.Done), end


@pytest.mark.slow
def test_refusals(client):
    long_prompt = "hello " * (CTX + 50)
    _, end = client.collect(client.request(kind="completion", prompt=long_prompt, max_tokens=4))
    assert isinstance(end, wire.Fail) and end.code == "context_length", end
    assert str(CTX) in end.message and not end.started

    _, end = client.collect(client.request(kind="chat", messages=[wire.ChatMessage("user", long_prompt)]))
    assert isinstance(end, wire.Fail) and end.code == "context_length", end

    _, end = client.collect(client.request(kind="completion", prompt=""))
    assert isinstance(end, wire.Fail) and end.code == "bad_request", end

    _, end = client.collect(client.request(kind="chat", model="gpt-4",
                                           messages=[wire.ChatMessage("user", "hi")]))
    assert isinstance(end, wire.Fail) and end.code == "model_not_found", end

    _, end = client.collect(client.request(kind="completion", prompt="hi", deadline=time.time() - 1))
    assert isinstance(end, wire.Fail) and end.code == "timeout", end

    _, end = client.collect(client.request(kind="completion", prompt="hi", max_tokens=0))
    assert isinstance(end, wire.Fail) and end.code == "bad_request", end


@pytest.mark.slow
def test_garbage_frames_are_dropped(client):
    enc = msgspec.msgpack.Encoder()
    client.send_raw(b"not msgpack")
    client.send_raw(b"a", b"b", b"c")
    client.send_raw(b"")
    client.send_raw(enc.encode([wire.PROTOCOL, "", "x", b"\xc1"]))  # envelope around an unreadable body
    client.send_raw(enc.encode([999, "", "x", enc.encode({"type": 101})]))  # future protocol
    client.send(wire.Chunk("nobody", "an engine does not take replies"))
    client.send(wire.Cancel("never-sent"))
    _, end = client.collect(client.request(kind="completion", prompt="Hello", max_tokens=4))
    assert isinstance(end, wire.Done), end


@pytest.mark.slow
def test_a_model_that_cannot_load_exits_without_ready(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(AssertionError, match="before READY"):
        EngineProc(tmp_path, "--model", str(bad))
    assert "cannot load" in (tmp_path / "engine.log").read_text()


@pytest.mark.slow
def test_overloaded_when_the_queue_is_full(tmp_path, zctx):
    e = EngineProc(tmp_path, "--max-queue", "1")
    c = Client(zctx, e.endpoint)
    try:
        running = c.request(kind="completion", prompt=COUNT_PROMPT, temperature=0.0, max_tokens=400)
        assert isinstance(c.next(running), wire.Chunk)  # the one slot is busy
        waiting = c.request(kind="completion", prompt="Hi", max_tokens=2)
        _, end = c.collect(c.request(kind="completion", prompt="Hi", max_tokens=2))
        assert isinstance(end, wire.Fail) and end.code == "overloaded", end
        c.send(wire.Cancel(waiting))  # cancelling a waiting request answers it at once
        _, end = c.collect(waiting)
        assert isinstance(end, wire.Fail) and end.code == "cancelled" and not end.started, end
        c.send(wire.Cancel(running))
        _, end = c.collect(running, timeout_s=10)
        assert isinstance(end, wire.Fail) and end.code == "cancelled", end
    finally:
        c.close()
        e.close()


@pytest.mark.slow
def test_sigterm_exits_promptly_and_fails_open_requests(tmp_path, zctx):
    e = EngineProc(tmp_path)
    c = Client(zctx, e.endpoint)
    try:
        rid = c.request(kind="completion", prompt=COUNT_PROMPT, temperature=0.0, max_tokens=400)
        assert isinstance(c.next(rid), wire.Chunk)
        t0 = time.monotonic()
        e.proc.send_signal(signal.SIGTERM)
        _, end = c.collect(rid, timeout_s=5)
        assert isinstance(end, wire.Fail) and end.code == "engine_down" and end.started, end
        assert e.proc.wait(5) == 0
        assert time.monotonic() - t0 < 5, "the engine took too long to stop"
        assert not e.sock_path.exists()
    finally:
        c.close()
        e.close()
