"""An engine that dies by a signal before it is ready is reported once, clearly, and not restarted forever.

A real node and its real engine child; the test sends each new engine child SIGILL while it
starts (importing llama.cpp, loading, proving itself), which is what a build for another CPU does
to it. No hook in the product: the test finds the child in /proc.
"""

import json
import os
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from cluster import wait_for
from zswarm.engine.model import default_model_path, model_name

pytestmark = pytest.mark.slow

MODEL = model_name(default_model_path())


def engine_children(pid: int) -> set[int]:
    """Pids of ``pid``'s children that run the engine (every thread's children: any may fork)."""
    found = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            try:
                with open(f"/proc/{kid}/cmdline", "rb") as f:
                    if b"zswarm.engine.proc" in f.read():
                        found.add(kid)
            except OSError:
                pass
    return found


def readyz(address: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_sigill_before_ready_is_reported_once_with_the_remedy_and_restarts_stop(cluster):
    node = cluster.node("s", "server", extra=["--threads", "1"])
    address = node.args[node.args.index("--address") + 1]
    killed: set[int] = set()
    deadline = time.monotonic() + 90
    state = ""
    while time.monotonic() < deadline:
        for pid in engine_children(node.proc.pid) - killed:
            os.kill(pid, signal.SIGILL)
            killed.add(pid)
        try:
            state = node.admin("status")["children"]["engine"]["state"]
        except Exception:
            state = ""
        if state == "failed":
            break
        time.sleep(0.002)
    assert state == "failed", f"the engine is {state!r} after {len(killed)} SIGILLs; log:\n{node.log()}"
    child = node.admin("status")["children"]["engine"]
    assert "killed by SIGILL before it was ready" in child["problem"], child
    assert "-m zswarm.install --rebuild" in child["problem"], child
    assert "gave up after 3 identical failures" in child["problem"], child

    # Restarts stop: no new engine child within a window longer than the next back-off (2 s).
    seen = engine_children(node.proc.pid)
    assert not seen - killed, "an engine is running although the node gave up"
    end = time.monotonic() + 4
    while time.monotonic() < end:
        assert not engine_children(node.proc.pid) - killed, "the node started the engine again"
        time.sleep(0.05)
    assert len(killed) == 3, f"expected exactly 3 engine starts, saw {len(killed)}"

    # The log says it once, clearly, and says it gave up.
    log = node.log()
    explained = [line for line in log.splitlines() if "was killed by SIGILL before it was ready" in line]
    assert len(explained) == 1, "\n".join(explained)
    assert "CPU instructions this machine cannot execute" in explained[0]
    assert "not restarting it" in log
    assert "Traceback" not in log

    # /readyz is not ready and says why; the API answers 503 with the same reason.
    status, body = wait_for(lambda: (r := readyz(address))[0] == 503 and "SIGILL" in r[1]["reason"] and r,
                            10, 0.2, what="/readyz to give the reason")
    assert "--rebuild" in body["reason"]
    api = openai.OpenAI(base_url=f"http://{address}/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as e:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert e.value.status_code == 503
    message = e.value.body["message"] if isinstance(e.value.body, dict) and "message" in e.value.body else str(e.value)
    assert "SIGILL" in message and "--rebuild" in message, message
