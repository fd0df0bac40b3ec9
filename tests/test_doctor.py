"""``zswarm doctor``: a passing machine, and each failure it names that can be made here.

The command runs as a user would run it (a child process); ports and peers are on 127.0.0.1.
The stale-wheel cases put a stand-in ``llama_cpp`` package first on the child's path: the
check's logic is what is tested there, not llama.cpp.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import REPO, free_port, wait_for
from zswarm import install
from zswarm.token import Token


def doctor(*args: str, env: dict | None = None) -> tuple[int, str, dict]:
    """(exit status, text output, JSON output) of `zswarm doctor ARGS` (run twice: text and --json)."""
    base = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    base.pop("ZSWARM_TOKEN", None)
    cmd = [sys.executable, "-m", "zswarm", "doctor", *args]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=base, cwd=REPO)
    js = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120, env=base, cwd=REPO)
    assert text.returncode == js.returncode, (text.stdout, js.stdout)
    assert "Traceback" not in text.stderr + js.stderr, text.stderr + js.stderr
    return text.returncode, text.stdout, json.loads(js.stdout)


def statuses(report: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in report["checks"]:
        out.setdefault(c["name"], []).append(c["status"])
    return out


def failing(report: dict) -> list[dict]:
    return [c for c in report["checks"] if c["status"] == "fail"]


@pytest.fixture
def base_args(tmp_path):
    return ["--no-mdns", "--state-dir", str(tmp_path / "state"), "--address", f"127.0.0.1:{free_port()}",
            "--p2p-listen", f"127.0.0.1:{free_port(span=2)}"]


def test_a_machine_that_can_run_a_server_passes(base_args):
    rc, text, report = doctor("server", *base_args)
    assert rc == 0, text
    assert report["ok"] is True
    s = statuses(report)
    assert s["llama.cpp"] == ["ok"] and s["model"] == ["ok"] and s["state dir"] == ["ok"]
    assert all(v == "ok" for v in s["port"]), s
    line = next(line for line in text.splitlines() if "llama.cpp" in line)
    assert line.startswith("ok") and "RPC backend" in line and "test generation" in line
    # `zswarm doctor` alone means a server
    rc, _, report = doctor(*base_args)
    assert rc == 0 and statuses(report)["model"] == ["ok"]


def test_a_busy_port_fails_with_the_fix(base_args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        args = [a if not a.startswith("127.0.0.1:") or base_args[i - 1] != "--address" else f"127.0.0.1:{port}"
                for i, a in enumerate(base_args)]
        rc, text, report = doctor("server", *args)
    assert rc == 1
    [bad] = failing(report)
    assert bad["name"] == "port" and f"127.0.0.1:{port}" in bad["detail"] and "in use" in bad["detail"]
    assert "ss -ltnp" in bad["fix"]
    assert "fix:" in text


def test_a_state_dir_that_cannot_be_written_fails(tmp_path, base_args):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    args = list(base_args)
    args[args.index("--state-dir") + 1] = str(blocker / "state")
    rc, _, report = doctor("server", *args)
    assert rc == 1
    [bad] = failing(report)
    assert bad["name"] == "state dir" and "Not a directory" in bad["detail"] and "--state-dir" in bad["fix"]


def test_a_malformed_token_fails(base_args):
    rc, _, report = doctor("worker", "--token", "zs1-not-a-token", *base_args[:3], *base_args[5:])
    assert rc == 1
    [bad] = failing(report)
    assert bad["name"] == "token" and "zswarm token new" in bad["fix"]


def test_bootstrap_peers_reachable_unreachable_and_of_another_cluster(cluster, token, base_args):
    peer = cluster.node("peer", "worker")
    wait_for(lambda: peer.admin("status")["id"], 30, what="the peer to start")
    silent = free_port()
    other = cluster.node("other", "worker", token=Token.generate().encode())
    wait_for(lambda: other.admin("status")["id"], 30, what="the other cluster's node to start")
    args = ["--token", token, *base_args[:3], *base_args[5:],
            "--bootstrap", f"{peer.endpoint},127.0.0.1:{silent},{other.endpoint}"]
    rc, _, report = doctor("worker", *args)
    assert rc == 1
    boot = [c for c in report["checks"] if c["name"] == "bootstrap"]
    assert [c["status"] for c in boot] == ["ok", "fail", "fail"], boot
    assert "refused the connection" in boot[1]["detail"]
    assert "refused the handshake" in boot[2]["detail"] and "another token" in boot[2]["fix"]


# --- a stale or foreign llama.cpp build (a stand-in llama_cpp first on the path) ---

FAKE_NO_RPC = '''
__version__ = "0.3.36"
def llama_supports_rpc(): return False
def llama_print_system_info(): return b"CPU : AVX2 = 1 |"
'''

FAKE_SIGILL = '''
import os, signal
__version__ = "0.3.36"
def llama_supports_rpc(): return True
def llama_print_system_info(): return b"CPU : AVX2 = 1 |"
class Llama:
    def __init__(self, *a, **k): os.kill(os.getpid(), signal.SIGILL)
'''


def fake_llama(tmp: Path, source: str) -> dict:
    pkg = tmp / "fake" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(source)
    return {"PYTHONPATH": f"{tmp / 'fake'}{os.pathsep}{REPO}"}


@pytest.mark.parametrize("source, words", [(FAKE_NO_RPC, "without the RPC backend"),
                                           (FAKE_SIGILL, "killed by SIGILL")])
def test_a_stale_wheel_is_caught_by_the_check_and_by_doctor(tmp_path, base_args, source, words):
    env = fake_llama(tmp_path, source)
    result = install.check(env={**os.environ, **env})
    assert not result["ok"] and words in result["problem"]
    assert install.rebuild_command() in result["problem"]
    rc, text, report = doctor("server", *base_args, env=env)
    assert rc == 1
    [bad] = failing(report)
    assert bad["name"] == "llama.cpp" and words in bad["detail"]
    assert bad["fix"] == install.rebuild_command()
