"""Worker mode, llama.cpp side: RPC server children, and an engine that splits the model over them.

Everything runs on 127.0.0.1. Our RPC server is llama.cpp's own ``ggml_backend_rpc_start_server``
(the call upstream's ``rpc-server`` binary makes), so it speaks upstream's protocol; llama-cpp-python
does not ship that binary, so talking to an upstream ``rpc-server`` is not tested here.

RPC servers and engines run with one thread and a small context so the suite stays quick on two
shared cores.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from test_engine import COUNT_PROMPT, CTX, Client, EngineProc
from zswarm import wire
from zswarm.engine.model import default_model_path
from zswarm.engine.rpc_server import listening_sockets

REPO = Path(__file__).resolve().parent.parent
N_LAYER = 30  # SmolLM2-135M's repeating layers
PROMPT = "The three primary colors are"


class RpcServer:
    """One ``python -m zswarm.engine.rpc_server`` child on a free 127.0.0.1 port."""

    def __init__(self, tmp: Path, *args: str, name: str = "rpc"):
        self.log_path = tmp / f"{name}.log"
        self.log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "zswarm.engine.rpc_server", "--port", "0", "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self.log)
        try:
            words = read_lines(self.proc, 20.0, self.read_log)[-1].split()
            assert words[0] == "READY", words
            self.endpoint, self.free = words[1], int(words[2])
            self.port = int(self.endpoint.rsplit(":", 1)[1])
        except BaseException:
            self.close()
            raise

    def read_log(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    assert self.proc.wait(5) == 0, f"rpc server did not stop cleanly; log:\n{self.read_log()}"
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
                    raise AssertionError(f"rpc server ignored SIGTERM; log:\n{self.read_log()}")
        finally:
            self.proc.stdout.close()
            self.log.close()


def read_lines(proc: subprocess.Popen, timeout_s: float, read_log) -> list[str]:
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


class SplitEngine(EngineProc):
    """An engine child in worker mode; ``layers`` is its LAYERS report."""

    def _wait_ready(self, timeout_s: float) -> str:
        import json

        lines = read_lines(self.proc, timeout_s, self.read_log)
        assert len(lines) == 2 and lines[0].startswith("LAYERS "), lines
        self.layers = json.loads(lines[0][len("LAYERS "):])
        return lines[1].split(" ", 1)[1]


def completion(client: Client, prompt: str, max_tokens: int = 16) -> tuple[str, object]:
    chunks, end = client.collect(client.request(kind="completion", prompt=prompt, temperature=0.0,
                                                top_p=1.0, max_tokens=max_tokens, seed=3))
    return "".join(chunks), end


@pytest.fixture(scope="module")
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rpc")
    started = []
    try:
        for name in ("a", "b"):
            started.append(RpcServer(tmp, name=name))
        yield started
    finally:
        for s in started:
            s.close()


@pytest.fixture(scope="module")
def reference():
    """The model in this process, as llama-cpp-python serves it without RPC."""
    import llama_cpp
    llm = llama_cpp.Llama(default_model_path(), n_ctx=CTX, n_threads=1, verbose=False)

    def complete(prompt: str, max_tokens: int = 16) -> str:
        return llm.create_completion(prompt, temperature=0.0, top_p=1.0, max_tokens=max_tokens,
                                     seed=3)["choices"][0]["text"]
    return complete


# --- fast: no model, no server ---

def test_rpc_server_refuses_a_non_loopback_host_without_allow_remote():
    for host in ("0.0.0.0", "10.1.2.3"):
        r = subprocess.run([sys.executable, "-m", "zswarm.engine.rpc_server", "--host", host, "--port", "1"],
                           cwd=REPO, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and not r.stdout, (r.returncode, r.stdout)
        assert "refusing to listen on" in r.stderr and "--allow-remote" in r.stderr, r.stderr


@pytest.mark.netns
def test_allow_remote_binds_elsewhere_with_a_loud_warning():
    """In a network namespace of its own (``unshare -n``), so 0.0.0.0 reaches nobody."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here (needs root and unshare)")
    p = subprocess.Popen(["unshare", "-n", sys.executable, "-m", "zswarm.engine.rpc_server", "--host", "0.0.0.0",
                          "--port", "0", "--threads", "1", "--allow-remote"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        words = read_lines(p, 20.0, lambda: "")[-1].split()
        assert words[0] == "READY" and words[1].startswith("0.0.0.0:"), words
    finally:
        p.terminate()
        _, err = p.communicate(timeout=5)
    assert b"WITHOUT ANY AUTHENTICATION" in err


def test_layer_assignment_follows_llama_cpp():
    from zswarm.engine.proc import assign_layers
    assert assign_layers(N_LAYER, [1, 3]) == [8, 22]  # what llama.cpp logs for this split
    assert assign_layers(N_LAYER, [1, 1, 2]) == [8, 8, 14]
    assert assign_layers(N_LAYER, [1]) == [N_LAYER]
    assert assign_layers(N_LAYER, [0, 1]) == [0, N_LAYER]


def test_engine_checks_the_split_against_the_servers():
    from zswarm.engine.proc import parse_args
    base = ["--endpoint", "ipc:///nowhere", "--rpc-servers", "127.0.0.1:1,127.0.0.1:2"]
    assert parse_args([*base, "--tensor-split", "1,3,0"]).tensor_split == [1, 3, 0]  # last: local
    assert not parse_args([*base, "--tensor-split", "1,3", "--no-local-layers"]).local_layers
    for bad in (["--tensor-split", "1,3"], ["--tensor-split", "1,3,1", "--no-local-layers"],
                ["--tensor-split", "0,0,0"], ["--tensor-split", "1,-1,1"]):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])
    with pytest.raises(SystemExit):
        parse_args(["--endpoint", "ipc:///nowhere", "--no-local-layers"])
    with pytest.raises(SystemExit):
        parse_args(["--endpoint", "ipc:///nowhere", "--rpc-servers", "127.0.0.1"])


# --- slow: real servers and a real model ---

@pytest.mark.slow
def test_split_output_equals_single_process_and_layers_follow_the_split(servers, tmp_path, zctx, reference):
    a, b = servers
    e = SplitEngine(tmp_path, "--rpc-servers", f"{a.endpoint},{b.endpoint}", "--tensor-split", "1,3",
                    "--no-local-layers")
    c = Client(zctx, e.endpoint)
    try:
        assert e.name == "smollm2-135m-instruct"
        assert set(e.layers) == {a.endpoint, b.endpoint, "local"}, e.layers
        assert e.layers["local"] == 0 and sum(e.layers.values()) == N_LAYER, e.layers
        assert abs(e.layers[a.endpoint] - N_LAYER / 4) <= 1, e.layers  # 1:3 within one layer
        text, end = completion(c, PROMPT)
        assert isinstance(end, wire.Done), end
        assert text == reference(PROMPT)
    finally:
        c.close()
        e.close()


@pytest.mark.slow
def test_local_layers_take_the_last_share_and_one_slot_serves(servers, tmp_path, zctx, reference):
    a, b = servers
    # --parallel 2 would give two Llamas one connection per server, which garbles it: one slot.
    e = SplitEngine(tmp_path, "--rpc-servers", f"{a.endpoint},{b.endpoint}", "--tensor-split", "1,1,2",
                    parallel=2)
    c = Client(zctx, e.endpoint)
    try:
        assert "--parallel 2 ignored" in e.read_log()
        assert sum(e.layers.values()) == N_LAYER
        assert abs(e.layers["local"] - N_LAYER / 2) <= 1, e.layers
        assert abs(e.layers[a.endpoint] - N_LAYER / 4) <= 1, e.layers
        ref = reference(COUNT_PROMPT, 12)
        ids = [c.request(kind="completion", prompt=COUNT_PROMPT, temperature=0.0, max_tokens=12)
               for _ in range(2)]
        for rid in ids:  # the second waits for the first
            chunks, end = c.collect(rid)
            assert isinstance(end, wire.Done) and "".join(chunks) == ref, end
    finally:
        c.close()
        e.close()


@pytest.mark.slow
def test_rpc_port_accepts_nothing_but_loopback(servers):
    for s in servers:
        assert listening_sockets(s.proc.pid) == [("127.0.0.1", s.port)]
    import ifaddr
    others = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
              if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]
    for addr in others:  # this machine's own addresses: the connection never leaves it
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((addr, servers[0].port), timeout=2).close()


@pytest.mark.slow
def test_an_unreachable_rpc_server_fails_the_load_with_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(AssertionError, match="before READY"):
            SplitEngine(tmp_path, "--rpc-servers", f"127.0.0.1:{port}", "--no-local-layers")
    assert f"cannot reach the RPC server 127.0.0.1:{port}" in (tmp_path / "engine.log").read_text()


@pytest.mark.slow
def test_a_worker_dying_mid_request_aborts_the_engine_and_the_survivor_serves_again(tmp_path, zctx, reference):
    """llama.cpp aborts the process that loses an RPC server (which is why the engine is a child);
    the surviving server takes a new engine at once."""
    a = RpcServer(tmp_path, "--mem", "123456789", "--cache-dir", str(tmp_path / "cache"), name="a")
    b = RpcServer(tmp_path, name="b")
    e = c = None
    try:
        assert a.free == 123456789  # --mem caps what the server announces
        e = SplitEngine(tmp_path, "--rpc-servers", f"{a.endpoint},{b.endpoint}", "--no-local-layers")
        c = Client(zctx, e.endpoint)
        rid = c.request(kind="completion", prompt=COUNT_PROMPT, temperature=0.0, max_tokens=400)
        assert isinstance(c.next(rid), wire.Chunk)
        b.proc.kill()
        t0 = time.monotonic()
        rc = e.proc.wait(10)
        died_in = time.monotonic() - t0
        assert rc == -signal.SIGABRT, (rc, e.read_log()[-2000:])
        assert died_in < 5, died_in
        assert "Remote RPC server crashed" in e.read_log()
        assert not any(isinstance(m, wire.Done) for m in c.inbox.get(rid, []))
        c.close()
        e.close()

        e = SplitEngine(tmp_path, "--rpc-servers", a.endpoint, "--no-local-layers")
        c = Client(zctx, e.endpoint)
        assert e.layers == {a.endpoint: N_LAYER, "local": 0}
        text, end = completion(c, PROMPT)
        assert isinstance(end, wire.Done) and text == reference(PROMPT), end
        assert any((tmp_path / "cache").iterdir())  # the output layer's 30 MB went to the tensor cache
    finally:
        if c is not None:
            c.close()
        if e is not None:
            e.close()
        a.close()
        b.proc.kill()
        b.close()
