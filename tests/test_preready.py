"""An engine that dies before it is ready is reported once, clearly; a fault stops the restarts.

At start-up (the engine was never ready) giving up ends the node: it exits non-zero with that
one line, so that systemd and the user learn that it cannot run here. Once the engine has been
ready, the same faults after a re-shard leave it ``failed`` and the node up, saying why in its
log, ``zswarm admin status`` and the API's 503.

A real node and its real engine child. What a build for another CPU does, the test does for real
without a hook in the product: Python's standard ``sitecustomize`` hook, put first on the engine's
path by the test, executes an illegal instruction (``ud2``) in the engine process once the
engine has installed its fault reporter, while it loads (only while a marker file exists, for
the test that lets the engine come up first). The other case is a SIGILL that another process
sends (found in /proc and killed by the test): named as such, and restarted.
"""

import os
import platform
import signal
import subprocess
import time

import openai
import pytest

from cluster import REPO, child_state, wait_for
from zswarm.engine.model import default_model_path, model_name

pytestmark = pytest.mark.slow

MODEL = model_name(default_model_path())

# In the engine process only: once its fault handler is installed, execute ud2 (x86-64's
# guaranteed-illegal instruction) from an executable page, on a thread of its own; with a
# MARKER path, only while that file exists.
SITECUSTOMIZE = r'''
import sys, threading, time

def _fault():
    import ctypes, mmap
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        f = sys.modules.get("zswarm.engine.fault")
        if f is not None and getattr(f, "_keep", None):
            break
        time.sleep(0.001)
    m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(b"\x0f\x0b")
    ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()

import os
with open("/proc/self/cmdline", "rb") as _f:
    if b"zswarm.engine.proc" in _f.read() and (MARKER is None or os.path.exists(MARKER)):
        threading.Thread(target=_fault, daemon=True).start()
'''


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


def engine(node) -> dict:
    return node.admin("status")["children"]["engine"]


def hook_env(tmp_path, marker=None) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE.replace("MARKER", repr(marker and str(marker))))
    return {"PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}


X86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ud2 is an x86-64 instruction")


@X86
def test_an_illegal_instruction_at_start_up_is_reported_once_with_the_remedy_and_ends_the_node(cluster, tmp_path):
    node = cluster.node("s", "server", extra=["--threads", "1"], env=hook_env(tmp_path))
    try:
        rc = node.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the node kept running; log:\n{node.log()[-3000:]}")
    assert rc == 1, rc
    log = node.log()
    last = log.strip().splitlines()[-1]
    assert last.startswith("zswarm: error: the engine was killed by SIGILL before it was ready"), last
    assert "CPU instructions this machine cannot execute" in last and "-m zswarm.install --rebuild" in last, last
    assert "SIGILL at " in last  # where: the faulting mapping and offset
    assert last.endswith("(gave up after 3 identical failures before ready)"), last
    assert "sent by" not in last, last
    # three tries, each reported with the mapping that faulted; explained once, then counted
    assert log.count("engine: started") == 3, log[-3000:]
    faults = [line for line in log.splitlines() if "FAULT {" in line]
    assert len(faults) == 3 and all('"signal": "SIGILL"' in f and '"library":' in f for f in faults), faults
    explained = [line for line in log.splitlines()[:-1] if "was killed by SIGILL before it was ready" in line]
    assert len(explained) == 1, "\n".join(explained)
    assert "not restarting it" in log
    assert "Traceback" not in log


@X86
def test_an_illegal_instruction_after_the_engine_was_ready_leaves_it_failed_and_the_node_up(cluster, tmp_path):
    marker = tmp_path / "fault-now"
    node = cluster.node("s", "server", extra=["--threads", "1"], env=hook_env(tmp_path, marker))
    address = node.args[node.args.index("--address") + 1]
    # the admin socket answers a moment before the engine child is listed: child_state, not engine()
    wait_for(lambda: child_state(node.admin("status"), "engine") == "ready", 90, 0.2, what="the engine to come up")
    marker.touch()  # from now on every engine faults while it loads
    node.admin("reshard")  # a new plan: the engine is restarted
    wait_for(lambda: engine(node)["state"] == "failed", 60, 0.1, what="the node to give up on the engine")
    child = engine(node)
    assert "killed by SIGILL before it was ready" in child["problem"], child
    assert "-m zswarm.install --rebuild" in child["problem"], child
    assert "gave up after 3 identical failures" in child["problem"], child

    # Restarts stop: no engine child for a window longer than the next back-off (2 s); the node stays.
    end = time.monotonic() + 4
    while time.monotonic() < end:
        assert not engine_children(node.proc.pid), "the node started the engine again"
        time.sleep(0.05)
    assert node.running()
    assert engine(node)["restarts"] == 2, engine(node)  # the planned restart, then 2 more: 3 tries

    log = node.log()
    explained = [line for line in log.splitlines() if "was killed by SIGILL before it was ready" in line]
    assert len(explained) == 1, "\n".join(explained)
    assert "CPU instructions this machine cannot execute" in explained[0]
    assert "not restarting it" in log and "zswarm: error:" not in log
    assert "Traceback" not in log

    # The API answers 503 with the reason. (/readyz is not checked here: the balancer keeps the
    # local route of an engine that was ready once, so it still says "ready".)
    api = openai.OpenAI(base_url=f"http://{address}/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as e:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert e.value.status_code == 503
    assert "SIGILL" in str(e.value) and "--rebuild" in str(e.value), str(e.value)

    # An operator's re-shard tries again (and, the fault being in every start, gives up again).
    node.admin("reshard")
    wait_for(lambda: engine(node)["restarts"] >= 4 and engine(node)["state"] == "failed", 30, 0.1,
             what="the engine to be tried again, and given up on again")
    assert node.running()


def test_a_sigill_sent_by_another_process_is_named_and_the_engine_restarts(cluster):
    node = cluster.node("s", "server", extra=["--threads", "1"])
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline:
        try:
            child = engine(node)
        except Exception:
            child = {}
        if child.get("stage") in ("loading", "proving") and child.get("pid"):  # its fault reporter is on
            os.kill(child["pid"], signal.SIGILL)
            killed = child["pid"]
        time.sleep(0.002)
    assert killed, f"never saw the engine starting; log:\n{node.log()}"
    # Not a fault of the build: it is said so, nothing gives up, and the engine comes up.
    wait_for(lambda: engine(node)["state"] == "ready", 60, 0.1, what="the engine to come up after the kill")
    log = node.log()
    explained = [line for line in log.splitlines() if "was killed by SIGILL before it was ready" in line]
    assert len(explained) == 1, explained
    assert f"SIGILL was sent by process {os.getpid()}" in explained[0], explained[0]
    assert "another process stopped it" in explained[0]
    assert "not restarting it" not in log and "cannot execute" not in log
