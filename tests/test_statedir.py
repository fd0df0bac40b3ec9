"""One node per state directory, and a state directory that cannot be used is one line of error.

Real node processes on 127.0.0.1. A second node on a running node's directory must be refused
before it binds or unlinks anything: the first keeps its sockets and keeps answering.
"""

import shutil
import subprocess
import sys

import pytest

from cluster import REPO, free_port, wait_for

pytestmark = pytest.mark.slow


def run_worker(token: str, state_dir, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zswarm", "worker", "--no-mdns",
                           "--p2p-listen", f"127.0.0.1:{free_port(span=2)}", "--state-dir", str(state_dir)],
                          capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "ZSWARM_TOKEN": token})


def test_a_second_node_on_a_running_nodes_state_dir_is_refused_and_the_first_keeps_working(cluster, token):
    first = cluster.node("a", "worker")
    node_id = wait_for(lambda: first.admin("status")["id"], 30, what="the first node to answer")
    sockets = sorted(p.name for p in first.state_dir.glob("*.sock"))
    r = run_worker(token, first.state_dir)
    assert r.returncode == 1, r
    assert r.stderr.strip() == (f"zswarm: error: another node (pid {first.proc.pid}) is running with the state "
                                f"directory {first.state_dir}: stop it, or give this one its own --state-dir"), r.stderr
    assert sorted(p.name for p in first.state_dir.glob("*.sock")) == sockets
    assert first.admin("status")["id"] == node_id and first.running()


def test_a_state_dir_that_is_a_file_or_read_only_is_one_line_of_error(tmp_path, token):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = run_worker(token, blocker)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"zswarm: error: cannot use the state directory {blocker}:") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr
    # read-only: a bind mount remounted read-only, in a mount namespace of the test's own
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for the read-only case")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
              f"ZSWARM_TOKEN={token} PYTHONPATH={REPO} {sys.executable} -m zswarm worker --no-mdns "
              f"--p2p-listen 127.0.0.1:{free_port(span=2)} --state-dir {ro}/state")
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot use the state directory" in r.stderr and "Read-only file system" in r.stderr, r.stderr
