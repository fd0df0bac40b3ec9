"""A start-up mistake ends the node at once: non-zero, one line on stderr, never a traceback.

Real ``python -m zswarm ROLE`` processes on 127.0.0.1 (mDNS off), each with one mistake: an
address that is in use or not this host's, a model that is missing, a directory, a text file, or
a GGUF file llama.cpp refuses (which only the engine child finds out: it exits EX_CONFIG and the
node gives up on it). systemd's units restart on failure, except status 2 (bad input); either
way they see the exit. A child that was ready once and fails later is restarted as before
(the supervisor test at the end, with small children of its own).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from cluster import REPO, free_port, wait_for

BOUND_S = 20.0  # a loaded 2-core machine; the mistakes found before spawning take under a second


def run_node(role: str, tmp_path, *args: str, token: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    argv = [sys.executable, "-m", "zswarm", role, "--no-mdns", "--state-dir", str(tmp_path / "state"),
            "--p2p-listen", f"127.0.0.1:{free_port(span=2)}", *args]
    if token:
        argv += ["--token", token]
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=BOUND_S + 30, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return r, time.monotonic() - t0


def assert_one_line(r: subprocess.CompletedProcess, took_s: float, status: int, *words: str) -> str:
    assert r.returncode == status, (r.returncode, r.stderr[-3000:])
    assert took_s < BOUND_S, took_s
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("zswarm: error: "), r.stderr[-3000:]
    for w in words:
        assert w in last, (w, last)
    return last


@pytest.fixture
def taken():
    """A port on 127.0.0.1 that something else is listening on."""
    s = socket.socket()
    s.bind(("127.0.0.1", free_port()))
    s.listen()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.mark.slow
def test_an_http_address_in_use_ends_the_server_at_once(tmp_path, taken):
    r, took = run_node("server", tmp_path, "--address", f"127.0.0.1:{taken}", "--threads", "1")
    last = assert_one_line(r, took, 1, f"127.0.0.1:{taken}", "--address", "Address already in use")
    assert took < 5, took  # the node's own bind: no gunicorn retries, no engine loaded first
    assert "gunicorn" not in r.stderr and "engine: started" not in r.stderr, r.stderr
    assert last == f"zswarm: error: cannot listen on 127.0.0.1:{taken} (--address): Address already in use"


@pytest.mark.slow
def test_an_http_address_that_is_not_this_hosts_ends_the_entry_point(tmp_path, token):
    r, took = run_node("federated", tmp_path, "--address", "192.0.2.1:8080", token=token)  # TEST-NET-1
    assert_one_line(r, took, 1, "192.0.2.1:8080", "not an address of this host")


@pytest.mark.slow
def test_a_workers_addresses_in_use_end_it(tmp_path, taken, token):
    # static mode: the RPC server's --listen, bound by the child, which exits EX_CONFIG
    r, took = run_node("worker", tmp_path, "--no-p2p", "--listen", f"127.0.0.1:{taken}", "--threads", "1")
    assert_one_line(r, took, 1, "RPC server cannot start", f"127.0.0.1:{taken}", "Address already in use")
    # p2p mode: the gossip port (--p2p-listen)
    argv = [sys.executable, "-m", "zswarm", "worker", "--no-mdns", "--token", token, "--state-dir",
            str(tmp_path / "state2"), "--p2p-listen", f"127.0.0.1:{taken}"]
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_one_line(r, time.monotonic() - t0, 1, f"127.0.0.1:{taken}", "Address already in use")


@pytest.mark.slow
def test_a_gateway_port_in_use_ends_a_federated_server(tmp_path, token):
    base = free_port(span=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 1))  # the gateway takes the gossip port + 1
        s.listen()
        argv = [sys.executable, "-m", "zswarm", "server", "--p2p", "--federated", "--no-mdns", "--token", token,
                "--state-dir", str(tmp_path / "state"), "--p2p-listen", f"127.0.0.1:{base}",
                "--address", f"127.0.0.1:{free_port()}", "--threads", "1"]
        t0 = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_one_line(r, time.monotonic() - t0, 1, f"127.0.0.1:{base + 1}", "Address already in use")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "directory", "text", "unreadable"])
def test_a_model_that_cannot_be_one_ends_the_server_before_anything_starts(tmp_path, kind):
    model = tmp_path / "model.gguf"
    if kind == "directory":
        model.mkdir()
    elif kind in ("text", "unreadable"):
        model.write_text("not a model\n")
    if kind == "unreadable":
        if os.geteuid() == 0:  # root reads anything: make it unreadable the way root cannot read
            model.unlink()
            os.symlink(tmp_path / "loop", model)
            os.symlink(model, tmp_path / "loop")
        else:
            model.chmod(0)
    why = {"missing": "no such file", "directory": "it is a directory, not a GGUF file",
           "text": "it is not a GGUF file", "unreadable": "cannot read it"}[kind]
    r, took = run_node("server", tmp_path, "--model", str(model), "--address", f"127.0.0.1:{free_port()}")
    last = assert_one_line(r, took, 2)
    assert last.startswith(f"zswarm: error: cannot load the model {model}: {why}"), last
    assert took < 5 and "engine: started" not in r.stderr, (took, r.stderr)


@pytest.mark.slow
def test_a_gguf_file_llama_cpp_refuses_ends_the_server_once_the_engine_says_so(tmp_path):
    """The header is GGUF, so only the engine finds out: it exits EX_CONFIG, once, and the node ends."""
    model = tmp_path / "broken.gguf"
    model.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + b"\0" * 64)  # v3, one tensor, no metadata
    r, took = run_node("server", tmp_path, "--model", str(model), "--address", f"127.0.0.1:{free_port()}",
                       "--threads", "1")
    assert_one_line(r, took, 1, "the engine cannot start: cannot load the model")
    assert r.stderr.count("engine: started") == 1, r.stderr[-3000:]  # not restarted


# --- the supervisor with small children of its own: fatal before ready, restarted after ---

CHILD = r"""
import os, sys, time
from zswarm.engine.child import EX_CONFIG, take_stdout
handshake = take_stdout()
if os.path.exists(sys.argv[1]):
    print("the widget file is missing", file=sys.stderr, flush=True)
    sys.exit(EX_CONFIG)
handshake.write("READY child\n"); handshake.flush()
time.sleep(600)
"""


@pytest.fixture
def supervisor():
    from zswarm.actors.supervisor import SupervisorActor

    ref = SupervisorActor.start(None)
    try:
        yield ref.proxy()
    finally:
        ref.stop(timeout=10)


def test_ex_config_before_ready_is_fatal_and_after_ready_is_restarted(supervisor, tmp_path):
    from zswarm.actors.supervisor import ChildSpec

    fatal: list[str] = []
    marker = tmp_path / "broken"
    marker.touch()
    supervisor.start_child(ChildSpec("never", [sys.executable, "-c", CHILD, str(marker)],
                                     env={"PYTHONPATH": str(REPO)}, on_fatal=fatal.append)).get(timeout=10)
    wait_for(lambda: fatal, 30, what="the fatal report")
    assert fatal == ["the never cannot start: the widget file is missing"], fatal
    assert supervisor.status().get(timeout=5)["never"]["state"] == "failed"

    fatal.clear()
    marker.unlink()
    supervisor.start_child(ChildSpec("later", [sys.executable, "-c", CHILD, str(marker)],
                                     env={"PYTHONPATH": str(REPO)}, on_fatal=fatal.append)).get(timeout=10)
    first = wait_for(lambda: (c := supervisor.status().get(timeout=5)["later"])["state"] == "ready" and c, 30,
                     what="the child to be ready")
    marker.touch()  # from now on it cannot start: but it was ready once, so it is retried
    os.kill(first["pid"], 9)
    wait_for(lambda: supervisor.status().get(timeout=5)["later"]["restarts"] >= 2, 30,
             what="a restart after the crash, and another after the EX_CONFIG exit")
    assert supervisor.status().get(timeout=5)["later"]["state"] in ("backoff", "starting")
    assert not fatal
