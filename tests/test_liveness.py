"""A child that stops making progress is noticed and restarted, not only one that exits.

The judgement itself (zswarm/actors/liveness.py) is a pure function, tested with a clock of the
test's own. Then real processes: the supervisor actor in this process with small beating
children; a federated server whose real engine child is SIGSTOPped; a worker whose RPC server
child is SIGSTOPped; and an engine stuck inside llama.cpp on a stopped RPC worker (alive, beating,
holding a request, evaluating nothing). Nodes run with ZSWARM_CHILD_HANG_S=3 so a hang shows
within seconds.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import openai
import pytest

from cluster import REPO, Cluster, free_port, wait_for
from zswarm.actors.liveness import FIRST_BEAT_S, Pulse, verdict
from zswarm.engine.model import default_model_path, model_name

MODEL = model_name(default_model_path())
HANG_S = 3.0


# --- the judgement (no processes) ---

def test_a_child_that_beats_is_alive_and_one_that_stops_is_hung():
    p = Pulse(now=100.0)
    p.beat("", 101.0)
    assert verdict(p, 100.0, 0.0, 103.9, hang_s=3, stuck_s=0, ready=True) == ""
    assert verdict(p, 100.0, 0.0, 104.5, hang_s=3, stuck_s=0, ready=True) == "sent no heartbeat for 4 s"
    assert verdict(p, 100.0, 0.0, 999.0, hang_s=0, stuck_s=0, ready=True) == ""  # 0: off


def test_the_first_beat_may_take_longer_and_a_paused_judge_holds_nothing_against_a_child():
    p = Pulse(now=100.0)
    assert verdict(p, 100.0, 0.0, 100.0 + FIRST_BEAT_S - 1, hang_s=3, stuck_s=0, ready=False) == ""
    assert "since it started" in verdict(p, 100.0, 0.0, 100.0 + FIRST_BEAT_S + 1, hang_s=3, stuck_s=0,
                                         ready=False)
    p.beat("", 101.0)
    # the supervisor itself did not run from 101 to 150: beats may sit unread in the pipe
    assert verdict(p, 100.0, 150.0, 152.0, hang_s=3, stuck_s=0, ready=True) == ""
    assert verdict(p, 100.0, 150.0, 153.5, hang_s=3, stuck_s=0, ready=True) != ""


def test_busy_is_not_stuck_but_a_standing_count_with_work_in_flight_is():
    p = Pulse(now=0.0)
    for t in range(0, 10):  # busy: the count moves at every beat
        p.beat(f"{t * 7} 2", float(t))
    assert verdict(p, 0.0, 0.0, 9.5, hang_s=3, stuck_s=5, ready=True) == ""
    for t in range(10, 20):  # idle: the count stands, nothing in flight
        p.beat("63 0", float(t))
    assert verdict(p, 0.0, 0.0, 19.5, hang_s=3, stuck_s=5, ready=True) == ""
    for t in range(20, 27):  # stuck: a request arrives, the count never moves again
        p.beat("63 1", float(t))
    assert verdict(p, 0.0, 0.0, 26.2, hang_s=3, stuck_s=5, ready=True) == \
        "made no progress for 7 s with 1 request(s) in flight"
    assert verdict(p, 0.0, 0.0, 26.5, hang_s=3, stuck_s=5, ready=False) == ""  # loading: not judged
    assert verdict(p, 0.0, 0.0, 26.5, hang_s=3, stuck_s=0, ready=True) == ""


def test_a_malformed_beat_still_counts_as_a_beat():
    p = Pulse(now=0.0)
    p.beat("lots of 1 2 3", 5.0)
    assert p.last[0] == 5.0 and p.last[2] == 0


# --- the supervisor with small children of its own ---

BEATER = r"""
import sys, time
from zswarm.engine.child import take_stdout, start_beat
handshake = take_stdout()
assert start_beat(handshake)
handshake.write("READY beater\n"); handshake.flush()
time.sleep(600)
"""


@pytest.fixture
def supervisor():
    from zswarm.actors.supervisor import SupervisorActor

    ref = SupervisorActor.start(None, HANG_S, 0)
    try:
        yield ref.proxy()
    finally:
        ref.stop(timeout=10)


def test_the_supervisor_kills_and_restarts_a_stopped_child_and_calls_it_down_at_once(supervisor):
    from zswarm.actors.supervisor import ChildSpec

    downs: list[tuple[float, str]] = []
    spec = ChildSpec("beater", [sys.executable, "-c", BEATER], env={"PYTHONPATH": str(REPO)},
                     beats=True, on_down=lambda why: downs.append((time.monotonic(), why)))
    supervisor.start_child(spec).get(timeout=10)
    first = wait_for(lambda: (c := supervisor.status().get(timeout=5)["beater"])["state"] == "ready" and c, 30,
                     what="the child to be ready")
    wait_for(lambda: supervisor.status().get(timeout=5)["beater"]["heartbeat"]["age_s"] is not None, 10,
             what="its first beat")
    os.kill(first["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        again = wait_for(lambda: (c := supervisor.status().get(timeout=5)["beater"])["state"] == "ready"
                         and c["pid"] != first["pid"] and c, HANG_S + 10, 0.1, what="a new child")
    finally:
        try:
            os.kill(first["pid"], signal.SIGCONT)  # if it was not killed, do not leave it stopped
        except ProcessLookupError:
            pass
    assert again["last_restart"] == "hung" and again["heartbeat"]["hangs"] == 1, again
    assert again["last_exit"].startswith("hung (sent no heartbeat for "), again
    assert len(downs) == 1 and downs[0][1].startswith("hung ("), downs
    assert HANG_S - 0.5 <= downs[0][0] - stopped_at <= HANG_S + 2.5, downs[0][0] - stopped_at
    with pytest.raises(ProcessLookupError):
        os.kill(first["pid"], 0)  # killed, not left stopped (reaped by the supervisor)


# --- real nodes ---

def engine(node) -> dict:
    # a node answers its admin socket a moment before it lists the engine child (see child_state)
    return node.admin("status")["children"].get("engine") or {"state": "not listed yet"}


def client(node, timeout_s: float = 60) -> openai.OpenAI:
    address = node.args[node.args.index("--address") + 1]
    return openai.OpenAI(base_url=f"http://{address}/v1", api_key="none", max_retries=0, timeout=timeout_s)


def ask(node) -> str:
    out = client(node).completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    return out.choices[0].text


@pytest.mark.slow
def test_a_stopped_engine_is_killed_and_restarted_and_its_requests_end_at_once(cluster):
    s = cluster.node("s", "server", extra=["--p2p", "--federated", "--threads", "1"],
                     env={"ZSWARM_CHILD_HANG_S": str(HANG_S)})
    wait_for(lambda: engine(s)["state"] == "ready", 90, 0.2, what="the engine to be ready")
    ask(s)
    first = engine(s)

    # a stream in flight when the engine stops must end, not hang until a timeout
    got_chunk, ended = threading.Event(), threading.Event()
    outcome: list = []

    def stream() -> None:
        try:
            for chunk in client(s, timeout_s=120).completions.create(
                    model=MODEL, prompt="Count slowly from one to a thousand:", max_tokens=1500,
                    temperature=0, stream=True):
                got_chunk.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    outcome.append(("finished", chunk.choices[0].finish_reason))
        except Exception as e:  # noqa: BLE001 - what ended it is the outcome
            outcome.append(("error", repr(e)))
        finally:
            ended.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert got_chunk.wait(60), "the stream never started"
    os.kill(first["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_for(lambda: engine(s)["last_restart"] == "hung", HANG_S + 5, 0.1, what="the engine to be called hung")
        noticed = time.monotonic() - stopped_at
        assert ended.wait(10), "the stream did not end when the engine was killed"
        ended_after = time.monotonic() - stopped_at
    finally:
        try:
            os.kill(first["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert outcome and outcome[0][0] == "error", outcome
    assert noticed <= HANG_S + 3 and ended_after <= HANG_S + 5, (noticed, ended_after)
    with pytest.raises(ProcessLookupError):
        os.kill(first["pid"], 0)

    again = wait_for(lambda: (e := engine(s))["state"] == "ready" and e["pid"] != first["pid"] and e, 60, 0.2,
                     what="the engine to come back")
    assert again["last_exit"].startswith("hung (sent no heartbeat for "), again
    assert again["heartbeat"]["hangs"] == 1 and again["restarts"] == first["restarts"] + 1, again
    assert ask(s)
    log = s.log()
    assert "engine sent no heartbeat for " in log and "; killing it" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_stopped_rpc_server_of_a_worker_is_killed_and_restarted(cluster):
    w = cluster.node("w", "worker", extra=["--threads", "1", "--mem", "1GiB"],
                     env={"ZSWARM_CHILD_HANG_S": str(HANG_S)})
    rpc = lambda: w.admin("status")["children"]["rpc"]  # noqa: E731
    first = wait_for(lambda: (c := rpc())["state"] == "ready" and c, 60, 0.2, what="the RPC server")
    os.kill(first["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_for(lambda: rpc()["last_restart"] == "hung", HANG_S + 5, 0.1, what="the RPC server to be called hung")
        assert time.monotonic() - stopped_at <= HANG_S + 3
    finally:
        try:
            os.kill(first["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    again = wait_for(lambda: (c := rpc())["state"] == "ready" and c["pid"] != first["pid"] and c, 30, 0.2,
                     what="the RPC server to come back")
    assert again["heartbeat"]["hangs"] == 1, again
    assert "rpc sent no heartbeat for " in w.log()


@pytest.mark.slow
def test_an_engine_stuck_on_a_stopped_rpc_worker_is_killed_for_making_no_progress(tmp_path):
    """Alive but stuck: llama.cpp waits forever on a worker that stopped mid-generation (it sets
    no timeouts), while the engine's beat thread keeps beating with a request in flight."""
    c = Cluster(tmp_path, "")
    port = free_port()
    try:
        # the worker's own supervisor must not rescue its stopped RPC server: that is not this test
        w = c.node("w", "worker", extra=["--no-p2p", "--listen", f"127.0.0.1:{port}", "--threads", "1"],
                   env={"ZSWARM_CHILD_HANG_S": "0"})
        s = c.node("s", "server", extra=["--threads", "1", "--no-local-layers", "--rpc-servers", f"127.0.0.1:{port}"],
                   env={"ZSWARM_CHILD_STUCK_S": "4"})
        wait_for(lambda: engine(s)["state"] == "ready", 120, 0.2, what="the engine over the RPC worker")
        first = engine(s)
        rpc_pid = w.admin("status")["children"]["rpc"]["pid"]

        got_chunk, ended = threading.Event(), threading.Event()

        def stream() -> None:
            try:
                for _ in client(s, timeout_s=120).completions.create(
                        model=MODEL, prompt="Count from one to a thousand:", max_tokens=1500, stream=True):
                    got_chunk.set()
            except Exception:  # noqa: BLE001 - the stream is cut; that it ends is what counts
                pass
            finally:
                ended.set()

        threading.Thread(target=stream, daemon=True).start()
        assert got_chunk.wait(60), "the stream never started"
        os.kill(rpc_pid, signal.SIGSTOP)
        try:
            wait_for(lambda: engine(s)["last_restart"] == "hung", 4 + 10, 0.2, what="the engine to be called stuck")
            assert ended.wait(10), "the stream did not end when the engine was killed"
            status = engine(s)
            assert "made no progress for " in status["last_exit"] and "1 request(s) in flight" in status["last_exit"]
        finally:
            os.kill(rpc_pid, signal.SIGCONT)
        wait_for(lambda: (e := engine(s))["state"] == "ready" and e["pid"] != first["pid"], 120, 0.2,
                 what="the engine to come back once the worker runs again")
        assert ask(s)
        assert "engine made no progress for " in s.log()
    finally:
        c.close()
