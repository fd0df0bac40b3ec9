"""Worker mode, llama.cpp side: RPC server children, and an engine that splits the model over them.

Everything runs on 127.0.0.1. Our RPC server is llama.cpp's own ``ggml_backend_rpc_start_server``
(the call upstream's ``rpc-server`` binary makes), so it speaks upstream's protocol; llama-cpp-python
does not ship that binary, so talking to an upstream ``rpc-server`` is not tested here.

RPC servers and engines run with one thread and a small context so the suite stays quick on two
shared cores.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_engine import COUNT_PROMPT, CTX, ChildProc, Client, EngineProc, read_lines, zctx  # noqa: F401 (fixture)
from zswarm import wire
from zswarm.engine.model import default_model_path
from zswarm.engine.rpc_server import listening_sockets

REPO = Path(__file__).resolve().parent.parent
N_LAYER = 30  # SmolLM2-135M's repeating layers
PROMPT = "The three primary colors are"


class RpcServer(ChildProc):
    """One ``python -m zswarm.engine.rpc_server`` child on a free 127.0.0.1 port."""

    what = "rpc server"
    clean_exit = True

    def __init__(self, tmp: Path, *args: str, name: str = "rpc"):
        self._spawn([sys.executable, "-m", "zswarm.engine.rpc_server", "--port", "0", "--threads", "1", *args],
                    tmp / f"{name}.log")
        try:
            lines = read_lines(self.proc, 20.0, self.read_log)
            assert lines[:-1] == ["STAGE proving"], lines  # it computed a test graph before READY
            words = lines[-1].split()
            assert words[0] == "READY", words
            self.endpoint, self.free = words[1], int(words[2])
            self.port = int(self.endpoint.rsplit(":", 1)[1])
        except BaseException:
            self.close()
            raise


class SplitEngine(EngineProc):
    """An engine child in worker mode; ``layers`` is its LAYERS report."""

    def _wait_ready(self, timeout_s: float) -> str:
        import json

        lines = read_lines(self.proc, timeout_s, self.read_log)
        assert len(lines) == 5 and lines[0] == "STAGE loading" and lines[2] == "STAGE proving", lines
        # before loading, what each RPC server says it has: [free, total] bytes (the server
        # clamps each worker's claim to it)
        assert lines[1].startswith("RPCMEM "), lines
        self.rpc_memory = json.loads(lines[1][len("RPCMEM "):])
        assert all(0 < free <= total for free, total in self.rpc_memory.values()), lines
        assert lines[3].startswith("LAYERS "), lines
        self.layers = json.loads(lines[3][len("LAYERS "):])
        assert set(self.rpc_memory) == set(self.layers) - {"local"}, lines
        return lines[4].split(" ", 1)[1]


def completion(client: Client, prompt: str, max_tokens: int = 16) -> tuple[str, object]:
    chunks, end = client.collect(client.request(kind="completion", prompt=prompt, temperature=0.0,
                                                top_p=1.0, max_tokens=max_tokens, seed=3))
    return "".join(chunks), end


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
    from zswarm.engine.layers import assign_layers
    assert assign_layers(N_LAYER, [1, 3]) == [8, 22]  # what llama.cpp logs for this split
    assert assign_layers(N_LAYER, [1, 1, 2]) == [8, 8, 14]
    assert assign_layers(N_LAYER, [1]) == [N_LAYER]
    assert assign_layers(N_LAYER, [0, 1]) == [0, N_LAYER]


def test_the_split_means_repeating_layers_and_is_realized_exactly():
    """--tensor-split is the proportion of the repeating layers; llama.cpp, handed the weights
    as they are, counts the output layer as one more slot (1:3 gives 8/22 above, not 7.5/22.5)."""
    from zswarm.engine.layers import assign_layers, layer_targets, split_for_counts
    cases = {(1, 3): [7.5, 22.5], (0.25, 0.75): [7.5, 22.5], (3, 1): [22.5, 7.5], (0.2, 0.8): [6, 24],
             (1, 1, 1): [10, 10, 10], (1, 1, 2): [7.5, 7.5, 15], (1, 3, 0): [7.5, 22.5, 0],
             (0.166667, 0.5, 0.333333): [5, 15, 10], (1,): [30], (0, 1): [0, 30], (1e-4, 1): [0, 30]}
    for weights, exact in cases.items():
        target = layer_targets(N_LAYER, weights)
        assert sum(target) == N_LAYER, (weights, target)
        assert all(abs(t - e) < 1 for t, e in zip(target, exact)), (weights, target)
        split = split_for_counts(target)
        assert all(w >= 0 for w in split) and abs(sum(split) - 1) < 1e-9, split
        assert assign_layers(N_LAYER, split) == target, (weights, split)
    assert layer_targets(N_LAYER, [1, 3]) == [7, 23]  # a tie goes to the larger weight
    assert layer_targets(N_LAYER, [1, 1, 2]) == [8, 7, 15]  # ... then to the earlier device
    assert layer_targets(N_LAYER, [1, 0, 1]) == [15, 0, 15]
    for n_layer in range(1, 100):  # every split of every count comes back exactly
        for counts in ([n_layer], [0, n_layer], [n_layer, 0], [n_layer // 3, n_layer - n_layer // 3, 0],
                       [1, 0, n_layer - 1], [n_layer // 2, 0, n_layer - n_layer // 2]):
            if min(counts) >= 0:
                assert assign_layers(n_layer, split_for_counts(counts)) == counts, counts


def test_the_output_layer_can_go_to_a_device_past_the_last_layer():
    """--no-local-layers: the CPU (last device) gets no repeating layer but the output layer,
    so the logits never cross the network; by default it stays with the last layer."""
    from zswarm.engine.layers import assign_layers, output_device, split_for_counts
    split = split_for_counts([7, 23, 0], output=2)
    assert assign_layers(N_LAYER, split) == [7, 23, 0] and output_device(N_LAYER, split) == 2
    # the last RPC device's cumulative point sits half a slot below the output slot, the CPU has the rest
    assert abs(split[0] + split[1] - (N_LAYER - 0.5) / (N_LAYER + 1)) < 1e-12, split
    assert abs(split[2] - 1.5 / (N_LAYER + 1)) < 1e-12, split
    assert output_device(N_LAYER, split_for_counts([7, 23, 0])) == 1
    assert output_device(N_LAYER, split_for_counts([7, 23])) == 1
    assert output_device(N_LAYER, [1, 3]) == 1 and output_device(N_LAYER, [1, 3, 0]) == 1  # llama.cpp's own
    for n_layer in range(1, 100):
        for counts in ([n_layer, 0], [0, n_layer, 0], [n_layer // 2, n_layer - n_layer // 2, 0, 0],
                       [n_layer // 3, 0, n_layer - n_layer // 3, 0]):
            for output in range(max(i for i, c in enumerate(counts) if c), len(counts)):
                split = split_for_counts(counts, output)
                assert all(w >= 0 for w in split) and abs(sum(split) - 1) < 1e-9, split
                assert assign_layers(n_layer, split) == counts, (counts, output)
                assert output_device(n_layer, split) == output, (counts, output, split)
    for counts, output in (([7, 23, 0], 0), ([7, 23, 0], 3), ([0, 0], 1)):
        with pytest.raises(ValueError):
            split_for_counts(counts, output)


def test_the_layer_count_comes_from_the_gguf_header(tmp_path):
    import struct

    from zswarm.engine.gguf import gguf_block_count
    assert gguf_block_count(default_model_path()) == N_LAYER

    def gguf(*kvs: bytes) -> Path:
        path = tmp_path / "m.gguf"
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
        return path

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    strs = struct.pack("<IQ", 8, 2) + s("a") + s("bc")
    # the architecture after its block count, and arrays of strings and numbers to skip first
    path = gguf(s("x.tokens") + struct.pack("<I", 9) + strs, s("x.ids") + struct.pack("<IIQ", 9, 5, 3) + bytes(12),
                s("qwen2.block_count") + struct.pack("<II", 4, 24), s("general.architecture") + struct.pack("<I", 8)
                + s("qwen2"))
    assert gguf_block_count(str(path)) == 24
    for bad in (gguf(s("general.architecture") + struct.pack("<I", 8) + s("llama")),  # no block_count
                gguf(s("general.architecture") + struct.pack("<I", 8))):  # cut short
        with pytest.raises(ValueError):
            gguf_block_count(str(bad))
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(40))
    with pytest.raises(ValueError):
        gguf_block_count(str(tmp_path / "not.gguf"))


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
        # 1:3 of the 30 repeating layers: 7.5 and 22.5, each within one layer
        assert e.layers[a.endpoint] in (7, 8) and e.layers[b.endpoint] in (22, 23), e.layers
        assert_layers_as_planned(e, [a.endpoint, b.endpoint], [1, 3])
        # ... and the output layer stays here: llama.cpp's own log line for il == n_layer says CPU
        assert_output_layer(e, "local", "CPU")
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
        assert e.layers["local"] == 15, e.layers  # 2/4 of 30
        assert e.layers[a.endpoint] in (7, 8) and e.layers[b.endpoint] in (7, 8), e.layers
        assert_layers_as_planned(e, [a.endpoint, b.endpoint, "local"], [1, 1, 2])
        assert_output_layer(e, "local", "CPU")  # with the last repeating layer
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
@pytest.mark.parametrize("split, local, exact", [("0.2,0.8", False, [6, 24, 0]), ("1,1,1", True, [10, 10, 10]),
                                                 ("0.75,0.25", False, [22.5, 7.5, 0])])
def test_layers_follow_other_splits(servers, tmp_path, zctx, reference, split, local, exact):
    a, b = servers
    e = SplitEngine(tmp_path, "--rpc-servers", f"{a.endpoint},{b.endpoint}", "--tensor-split", split,
                    *([] if local else ["--no-local-layers"]))
    c = Client(zctx, e.endpoint)
    try:
        keys = [a.endpoint, b.endpoint, "local"]
        got = [e.layers[k] for k in keys]
        assert sum(got) == N_LAYER and all(abs(g - x) < 1 for g, x in zip(got, exact)), e.layers
        assert_layers_as_planned(e, keys[:3 if local else 2], [float(w) for w in split.split(",")])
        assert_output_layer(e, "local", "CPU")
        text, end = completion(c, PROMPT)
        assert isinstance(end, wire.Done) and text == reference(PROMPT), end
    finally:
        c.close()
        e.close()


def assert_layers_as_planned(e: SplitEngine, keys: list[str], weights: list[float]) -> None:
    """LAYERS (which the engine reads from llama.cpp's per-layer log) is what the engine planned
    for ``weights``, and what the Python replica of llama.cpp predicts for the split it used."""
    from zswarm.engine.layers import assign_layers, layer_targets, split_for_counts
    target = layer_targets(N_LAYER, weights)
    assert [e.layers[k] for k in keys] == target, (e.layers, target)
    assert assign_layers(N_LAYER, split_for_counts(target)) == target
    log = e.read_log()
    assert "did not say where the layers went" not in log  # the counts are llama.cpp's own
    assert "llama.cpp placed the" not in log and f"{N_LAYER} layers split" in log, log[-3000:]


def assert_output_layer(e: SplitEngine, key: str, device: str) -> None:
    """The engine logged llama.cpp's own line for the output layer (layer n_layer): on the device
    named ``device`` (a regular expression), the one the engine knows as ``key``."""
    log = e.read_log()
    assert re.search(rf"output layer on {re.escape(key)} \(llama\.cpp: load_tensors: layer +{N_LAYER} "
                     rf"assigned to device {device},", log), log[-3000:]
    assert "not on local" not in log, log[-3000:]


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

        # Local layers on but none wanted: the output layer goes with the last repeating layer, to
        # the server (with --no-local-layers it would stay here, and no tensor would be cached).
        e = SplitEngine(tmp_path, "--rpc-servers", a.endpoint, "--tensor-split", "1,0")
        c = Client(zctx, e.endpoint)
        assert e.layers == {a.endpoint: N_LAYER, "local": 0}
        assert_output_layer(e, a.endpoint, r"RPC\d+")
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
