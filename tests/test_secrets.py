"""The token and the API keys stay out of every command line and every child's environment.

Real node processes on 127.0.0.1 (mDNS off), one cluster given its token three ways: a
worker-mode server by ``--token-file`` (and its API keys by ``--api-key-file``), a worker by
``ZSWARM_TOKEN``, a federated entry point by LocalAI's ``LOCALAI_P2P_TOKEN`` (and its keys by
``ZSWARM_API_KEY_FILE``). Each node's process tree (children and grandchildren such as
gunicorn's workers, found through ``/proc/*/stat``) is read back from ``/proc``. Then the
mistakes: a token file that is missing, empty or malformed, or given beside ``--token``, is one
line of error and no traceback.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster import REPO, Cluster, child_state, descendants, free_port, wait_for
from zswarm.config import SECRET_ENVS
from zswarm.token import Token

SERVER = ["--p2p", "--threads", "1", "--reshard-settle", "1", "--parallel", "1"]


def write_secret(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def proc_bytes(pid: int, what: str) -> bytes:
    return Path(f"/proc/{pid}/{what}").read_bytes()


def environ_names(pid: int) -> set[str]:
    return {item.split(b"=", 1)[0].decode(errors="replace")
            for item in proc_bytes(pid, "environ").split(b"\0") if item}


@pytest.fixture(scope="module")
def secret_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secrets")
    token = Token.generate().encode()
    keys = [f"sk-{secrets.token_urlsafe(16)}" for _ in range(3)]
    token_file = write_secret(tmp / "token", token + "\n")
    server_keys = write_secret(tmp / "server-keys", f"# the API's keys\n\n{keys[0]}\n  {keys[1]}\n")
    entry_keys = write_secret(tmp / "entry-keys", f"{keys[2]}\n")
    c = Cluster(tmp, "")  # no --token: each node is given it another way
    try:
        s = c.node("s", "server", extra=SERVER + ["--token-file", token_file, "--api-key-file", server_keys])
        w = c.node("w", "worker", bootstrap=[s], extra=["--mem", "1GiB", "--threads", "1"],
                   env={"ZSWARM_TOKEN": token})
        f = c.node("f", "federated", bootstrap=[s],
                   env={"LOCALAI_P2P_TOKEN": token, "ZSWARM_API_KEY_FILE": entry_keys})

        def up() -> bool:
            st = s.admin("status")
            shard = st.get("shard") or {}
            return (child_state(st, "engine") == "ready" and child_state(st, "http") == "ready"
                    and not shard.get("pending") and not shard.get("settling") and bool(shard.get("workers"))
                    and child_state(w.admin("status"), "rpc") == "ready"
                    and child_state(f.admin("status"), "http") == "ready")

        def alive() -> None:
            for n in (s, w, f):
                assert n.running(), f"{n.name} exited:\n{n.log()[-3000:]}"

        wait_for(up, 120, 0.2, what="the server split over the worker, and every child ready", check=alive)
        yield {"token": token, "keys": keys, "nodes": {"s": s, "w": w, "f": f}}
    finally:
        c.close()


@pytest.mark.slow
def test_no_child_and_no_command_line_holds_the_token_or_a_key(secret_cluster):
    token, keys, nodes = secret_cluster["token"], secret_cluster["keys"], secret_cluster["nodes"]
    needles = [token.encode()] + [k.encode() for k in keys]
    # the engine must be among the children walked: a re-shard (the worker's memory, re-announced
    # once its RPC server is up) may be restarting it at this moment
    wait_for(lambda: any(b"zswarm.engine.proc" in proc_bytes(pid, "cmdline")
                         for pid in descendants(nodes["s"].proc.pid)), 60, 0.2, what="the server's engine",
             retry=(FileNotFoundError, ProcessLookupError))
    seen: dict[str, list[bytes]] = {}
    for name, node in nodes.items():
        assert not any(x in proc_bytes(node.proc.pid, "cmdline") for x in needles), f"{name}'s own command line"
        tree = descendants(node.proc.pid)
        seen[name] = []
        for pid in tree:
            try:
                cmdline, environ = proc_bytes(pid, "cmdline"), proc_bytes(pid, "environ")
                names = environ_names(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue  # ended between the listing and the read
            seen[name].append(cmdline)
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")
            for x in needles:
                assert x not in cmdline, f"{name}: a secret in the command line of {shown}"
                assert x not in environ, f"{name}: a secret in the environment of {shown}"
            assert not names & SECRET_ENVS, f"{name}: {sorted(names & SECRET_ENVS)} in the environment of {shown}"
    # the walk found the children it is about, grandchildren (gunicorn's workers) included
    assert any(b"zswarm.engine.proc" in c for c in seen["s"]), seen["s"]
    assert sum(b"gunicorn" in c for c in seen["s"]) >= 2 and sum(b"gunicorn" in c for c in seen["f"]) >= 2, seen
    assert any(b"zswarm.engine.rpc_server" in c for c in seen["w"]), seen["w"]
    # the node's warnings: none for a file of mode 0600 or a token in the environment
    for node in nodes.values():
        assert "process list" not in node.log() and "open to other users" not in node.log()


@pytest.mark.slow
def test_the_keys_from_files_guard_the_api_and_admin_token_prints_the_token(secret_cluster):
    token, keys, nodes = secret_cluster["token"], secret_cluster["keys"], secret_cluster["nodes"]

    def models(node, key):
        url = "http://" + node.args[node.args.index("--address") + 1] + "/v1/models"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            return urllib.request.urlopen(req, timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    s, f = nodes["s"], nodes["f"]
    assert models(s, None) == 401 and models(s, keys[0]) == 200 and models(s, keys[1]) == 200
    assert models(s, keys[2]) == 401 and models(f, keys[2]) == 200 and models(f, keys[0]) == 401
    out = subprocess.run([sys.executable, "-m", "zswarm", "admin", "--state-dir", str(s.state_dir), "token"],
                         capture_output=True, text=True, timeout=30, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == token, out


# --- mistakes: one line, no traceback ---

def start_all(cases: dict[str, tuple[list[str], dict[str, str]]],
              tmp_path: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run ``zswarm worker ARGS`` for every case at once (each is a second of imports)."""
    procs = {}
    for name, (args, env) in cases.items():
        argv = [sys.executable, "-m", "zswarm", *args, "--no-mdns", "--p2p-listen",
                f"127.0.0.1:{free_port(span=2)}"]
        if "--state-dir" not in args:
            argv += ["--state-dir", str(tmp_path / f"state-{name}")]
        procs[name] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                       env={**os.environ, "PYTHONPATH": str(REPO), **env})
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=60)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def test_a_token_file_that_cannot_be_used_is_one_line_of_error(tmp_path):
    token = Token.generate().encode()
    good = write_secret(tmp_path / "good", token)
    cases = {
        "missing": (["worker", "--token-file", str(tmp_path / "nope")], {}),
        "missing-env": (["worker"], {"ZSWARM_TOKEN_FILE": str(tmp_path / "nope")}),
        "empty": (["worker", "--token-file", write_secret(tmp_path / "empty", "\n")], {}),
        "malformed": (["worker", "--token-file", write_secret(tmp_path / "bad", "zs1-garbage\n")], {}),
        "both": (["worker", "--token", token, "--token-file", good], {}),
        "no-keys": (["federated", "--token-file", good,
                     "--api-key-file", write_secret(tmp_path / "k", "# none\n")], {}),
    }
    words = {"missing": "cannot read the token file", "missing-env": "cannot read the token file",
             "empty": "is empty", "malformed": "holds no valid token", "both": "give it one way",
             "no-keys": "holds no key"}
    for name, r in start_all(cases, tmp_path).items():
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr + r.stdout, (name, r)
        assert lines[0].startswith("zswarm: error: ") and words[name] in lines[0], (name, lines)
        assert token not in r.stderr and "garbage" not in r.stderr, (name, lines)


def test_a_token_on_the_command_line_still_works_but_warns_once(tmp_path):
    token = Token.generate().encode()
    blocker = tmp_path / "a-file"  # a state directory that is a file: the node stops just after the warnings
    blocker.write_text("x")
    open_file = write_secret(tmp_path / "token", token, mode=0o644)
    cases = {"argv": (["worker", "--token", token, "--state-dir", str(blocker)], {}),
             "open": (["worker", "--token-file", open_file, "--state-dir", str(blocker)], {})}
    results = start_all(cases, tmp_path)
    for name, words in (("argv", "visible to every local user in the process list"),
                        ("open", f"open to other users (mode 0644): chmod 600 {open_file}")):
        r = results[name]
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 2 and "cannot use the state directory" in lines[1], (name, r)
        assert "WARNING" in lines[0] and words in lines[0] and token not in lines[0], (name, lines)
