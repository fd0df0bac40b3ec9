"""Deployment: the systemd units of services/, the Ansible playbooks of deploy/, and three hosts.

- every playbook passes ``ansible-playbook --syntax-check`` and ``ansible-lint`` (offline,
  ansible.builtin only);
- ``systemd-analyze verify`` passes on the units, and their exposure stays low;
- deploy/site.yml, run for real against this machine (``connection: local``, everything under a
  temporary prefix, nodes started directly since systemd is not PID 1 here), brings up a server
  and two workers on one host that form a cluster and answer a chat completion with the API key
  the role made (and refuse one without it); a second run changes nothing and keeps the key; rolling-restart.yml brings every node back; stop.yml leaves nothing running;
- three network namespaces on one bridge act as three hosts: a server, a federated entry point
  and a worker find each other (by mDNS across the bridge, and by bootstrap), and a completion
  sent to the entry point from the worker's host is answered by the server's host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import pytest

from cluster import REPO, free_port, wait_for
from netns import NetnsLab, netns_available

pytestmark = pytest.mark.slow

DEPLOY = REPO / "deploy"
SERVICES = REPO / "services"
PLAYBOOKS = ["site.yml", "stop.yml", "rolling-restart.yml", "add-worker.yml"]
UNITS = ["zswarm-server.service", "zswarm-federated.service", "zswarm-worker@.service"]
MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
BIN = Path(sys.executable).parent


def ansible_env(tmp: Path) -> dict[str, str]:
    """ansible from this virtualenv, its scratch files in ``tmp``, plain output."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_PIPELINING": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local"), "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-remote"),
            "ANSIBLE_HOME": str(tmp / "ansible-home"), "PYTHONUNBUFFERED": "1"}


def need_tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}:{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is needed for this test and is not installed (pip install ansible-core ansible-lint)")
    return path


# -- syntax and lint -------------------------------------------------------------------------------

def test_every_playbook_passes_syntax_check(tmp_path):
    need_tool("ansible-playbook")
    assert sorted(p.name for p in DEPLOY.glob("*.yml")) == sorted(PLAYBOOKS)
    for playbook in PLAYBOOKS:
        r = subprocess.run([str(BIN / "ansible-playbook"), "-i", "inventory.example.ini", "--syntax-check", playbook],
                           cwd=DEPLOY, env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{playbook}:\n{r.stdout}{r.stderr}"


def test_example_inventory_has_every_group_and_only_documentation_addresses(tmp_path):
    r = subprocess.run([str(BIN / "ansible-inventory"), "-i", "inventory.example.ini", "--list"], cwd=DEPLOY,
                       env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120, check=True)
    inv = json.loads(r.stdout)
    for group in ("servers", "federated", "workers"):
        assert inv[group]["hosts"], group
    hosts = inv["_meta"]["hostvars"]
    assert all(h["ansible_host"].startswith("192.0.2.") for h in hosts.values()), hosts


def test_ansible_lint_is_clean(tmp_path):
    need_tool("ansible-lint")
    # offline (deploy/.ansible-lint): nothing is fetched; the production profile is the strictest
    r = subprocess.run([str(BIN / "ansible-lint"), "--nocolor"], cwd=DEPLOY,
                       env={**ansible_env(tmp_path), "ANSIBLE_LINT_NODEPS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Passed" in r.stdout + r.stderr and "production" in r.stdout + r.stderr, r.stdout + r.stderr


# -- the units -------------------------------------------------------------------------------------

def systemd_version() -> int:
    out = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True, check=True).stdout
    return int(re.match(r"systemd (\d+)", out).group(1))


def test_units_pass_systemd_analyze_verify_and_are_hardened(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is needed to check the units: apt-get install systemd "
                    "(it installs the tools; systemd need not run)")
    # verify checks that ExecStart= exists: point it at a stand-in, as the deploy role does with a prefix
    exe = tmp_path / "zswarm"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    paths = []
    for unit in UNITS:
        text = (SERVICES / unit).read_text()
        assert "ExecStart=/opt/zswarm/venv/bin/zswarm " in text
        text = text.replace("/opt/zswarm/venv/bin/zswarm", str(exe))
        name = unit.replace("@.", "@a.")  # an instance of the template
        (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
        for setting in ("User=zswarm", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                        "PrivateTmp=yes", "KillMode=mixed", "Restart=on-failure",
                        "EnvironmentFile=/etc/zswarm/zswarm.env"):
            assert setting in text, (unit, setting)
        assert re.search(r"^StateDirectory=zswarm/", text, re.M) and re.search(r"^TimeoutStopSec=\d+", text, re.M)
    r = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # Keys newer than this systemd (the restart backoff needs 254+) are ignored with a warning;
    # anything else said is a problem.
    newer = {"RestartSteps", "RestartMaxDelaySec"} if systemd_version() < 254 else set()
    problems = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()
                and not any(f"Unknown key '{k}'" in line or f"Unknown key name '{k}'" in line for k in newer)]
    assert not problems, "\n".join(problems)
    for path in paths:
        # exposure 0.0 (locked down) .. 10.0 (unprotected): stay at 2.0 or below
        s = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20", str(path)],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert s.returncode == 0, s.stdout[-2000:] + s.stderr


# -- site.yml for real, on this machine ------------------------------------------------------------

RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


class Deployment:
    """One host (localhost, connection local) playing a server and two workers, under ``prefix``."""

    def __init__(self, prefix: Path, work: Path):
        self.prefix, self.work = prefix, work
        # A snapshot of the checkout, so that both runs install the same thing even while the
        # working tree is being edited.
        self.source = work / "checkout"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("zswarm", "services"):
            shutil.copytree(REPO / name, self.source / name, ignore=ignore)
        for name in ("pyproject.toml", "setup.cfg", "README.md"):
            shutil.copy(REPO / name, self.source / name)
        self.server_port, self.http_port = free_port(span=2), free_port()
        self.worker_ports = {"a": free_port(span=2), "b": free_port(span=2)}
        (work / "inventory.ini").write_text(
            "[servers]\nlocalhost\n\n[workers]\nlocalhost\n\n[all:vars]\nansible_connection=local\n"
            f"ansible_python_interpreter={sys.executable}\nansible_become=false\n")
        (work / "vars.json").write_text(json.dumps({
            "zswarm_prefix": str(prefix), "zswarm_service_manager": "direct", "zswarm_source": str(self.source),
            "zswarm_python": sys.executable, "zswarm_mdns": False, "zswarm_server_threads": 1,
            "zswarm_server_p2p_listen": f"127.0.0.1:{self.server_port}",
            "zswarm_server_address": f"127.0.0.1:{self.http_port}",
            "zswarm_worker_instances": [{"name": n, "p2p_listen": f"127.0.0.1:{p}"}
                                        for n, p in self.worker_ports.items()],
        }))
        self.venv = prefix / "opt" / "zswarm" / "venv"
        self.run_dir = prefix / "run" / "zswarm"
        self.state = prefix / "var" / "lib" / "zswarm"

    def play(self, playbook: str, timeout_s: float) -> dict[str, int]:
        started = time.monotonic()
        r = subprocess.run([str(BIN / "ansible-playbook"), "-i", "inventory.ini", "-e", "@vars.json",
                            str(DEPLOY / playbook)], cwd=self.work, env=ansible_env(self.work),
                           capture_output=True, text=True, timeout=timeout_s)
        (self.work / f"{playbook}.{int(started)}.log").write_text(r.stdout + r.stderr)
        assert r.returncode == 0, f"{playbook} failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
        recap = {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(5))) for m in RECAP.finditer(r.stdout)}
        assert set(recap) == {"localhost"}, r.stdout[-3000:]
        ok, changed, failed = recap["localhost"]
        return {"ok": ok, "changed": changed, "failed": failed, "seconds": round(time.monotonic() - started, 1),
                "stdout": r.stdout}

    def admin(self, node: str, command: str):
        """``zswarm admin --state-dir ... COMMAND --json`` with the deployed zswarm, as an operator would."""
        r = subprocess.run([str(self.venv / "bin" / "zswarm"), "admin", "--state-dir", str(self.state / node),
                            command, "--json"], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return None
        return json.loads(r.stdout)

    def pids(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in self.run_dir.glob("*.pid")} if self.run_dir.exists() else {}

    def kill_all(self) -> None:
        """The fallback of teardown: SIGKILL each node's process group, by its pidfile."""
        for pid in self.pids().values():
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def processes_under(prefix: Path) -> list[int]:
    """Every live process whose command line names ``prefix``: the nodes and their children."""
    mark = str(prefix).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if mark in (entry / "cmdline").read_bytes() and alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def cluster_formed(d: Deployment) -> bool:
    want = {"server": {"localhost-worker-a", "localhost-worker-b"},
            "worker-a": {"localhost", "localhost-worker-b"},
            "worker-b": {"localhost", "localhost-worker-a"}}
    for node, names in want.items():
        peers = d.admin(node, "peers")
        if peers is None or {p["name"] for p in peers if p["state"] == "alive"} != names:
            return False
    return True


def engine_ready(d: Deployment) -> bool:
    status = d.admin("server", "status")
    return bool(status) and any(MODEL in r["models"] for r in status["gateway"]["routes"])


def chat(port: int, key: str) -> tuple[str, str]:
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12)
    return raw.headers["x-zswarm-node"], raw.parse().choices[0].message.content


def test_site_yml_deploys_a_cluster_on_this_machine_and_a_second_run_changes_nothing(tmp_path):
    need_tool("ansible-playbook")
    # A short prefix: the nodes' Unix sockets live under it (at most 107 bytes per path).
    prefix = Path(tempfile.mkdtemp(prefix="zsd-", dir="/tmp"))
    d = Deployment(prefix, tmp_path)
    timings, passed = {}, False
    try:
        first = d.play("site.yml", timeout_s=900)  # a fresh virtualenv; llama-cpp-python from pip's wheel cache
        timings["first run"] = first["seconds"]
        assert first["changed"] > 0
        assert set(d.pids()) == {"server", "worker-a", "worker-b"}
        assert all(alive(p) for p in d.pids().values())
        env_file = prefix / "etc" / "zswarm" / "zswarm.env"
        assert env_file.stat().st_mode & 0o777 == 0o600
        assert re.search(r"^ZSWARM_TOKEN=zs1\S+$", env_file.read_text(), re.M)
        # no zswarm_api_keys in the inventory: the first server made one, kept beside the token
        keys = re.findall(r"^ZSWARM_API_KEYS=(zsk-[A-Za-z0-9_-]{40,})$", env_file.read_text(), re.M)
        assert len(keys) == 1, "no generated API key in zswarm.env"
        key = keys[0]
        for unit in ("zswarm-server.service", "zswarm-federated.service", "zswarm-worker@.service"):
            installed = (prefix / "etc" / "systemd" / "system" / unit).read_text()
            assert f"ExecStart={d.venv}/bin/zswarm " in installed
        wait_for(lambda: cluster_formed(d), 30, 0.5, what="the server and both workers to see each other alive")
        wait_for(lambda: engine_ready(d), 60, 0.5, what="the server's engine")
        server_id = d.admin("server", "status")["id"]
        node, content = chat(d.http_port, key)
        assert node == server_id and content
        with pytest.raises(openai.AuthenticationError):  # the API is not open
            chat(d.http_port, "none")

        before = d.pids()
        second = d.play("site.yml", timeout_s=300)
        timings["second run"] = second["seconds"]
        assert second["changed"] == 0, second["stdout"][-4000:]
        assert d.pids() == before, "a second run must not restart anything"
        assert f"ZSWARM_API_KEYS={key}\n" in env_file.read_text(), "the second run must keep the key"

        restart = d.play("rolling-restart.yml", timeout_s=300)
        timings["rolling restart"] = restart["seconds"]
        after = d.pids()
        assert set(after) == set(before) and not set(after.values()) & set(before.values())
        assert d.admin("server", "status")["id"] == server_id  # the same node, restarted
        wait_for(lambda: cluster_formed(d), 30, 0.5, what="the cluster to form again after the rolling restart")
        wait_for(lambda: engine_ready(d), 60, 0.5, what="the server's engine after the restart")
        assert chat(d.http_port, key)[0] == server_id

        stop = d.play("stop.yml", timeout_s=300)
        timings["stop"] = stop["seconds"]
        assert stop["changed"] > 0
        assert d.pids() == {}
        deadline = time.monotonic() + 10
        while processes_under(prefix) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not processes_under(prefix), "processes still running after stop.yml"
        print(f"deploy timings (s): {timings}")
        passed = True
    finally:
        d.kill_all()
        for pid in processes_under(prefix):  # whatever a failed run left without a pidfile
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not passed:  # keep what tells why: the playbooks' output and the nodes' logs
            keep = REPO / "test-artifacts" / "deploy"
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir(parents=True)
            for log in [*tmp_path.glob("*.log"), *(prefix / "var" / "log" / "zswarm").glob("*.log")]:
                shutil.copy(log, keep / log.name)
        shutil.rmtree(prefix, ignore_errors=True)


# -- three hosts in network namespaces -------------------------------------------------------------

CLIENT = """
import json, sys, openai
api = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0, timeout=120)
raw = api.chat.completions.with_raw_response.create(
    model=sys.argv[2], messages=[{"role": "user", "content": "Name three colours."}], temperature=0, max_tokens=12)
print(json.dumps({"node": raw.headers["x-zswarm-node"], "content": raw.parse().choices[0].message.content}))
"""


@pytest.mark.netns
@pytest.mark.parametrize("discovery", ["mdns", "bootstrap"])
def test_three_hosts_find_each_other_and_a_completion_crosses_hosts(cluster, discovery):
    reason = netns_available()
    if reason:
        pytest.fail(f"network namespaces are needed for this test: {reason}")
    with NetnsLab(3) as lab:
        h0, h1, h2 = lab.hosts

        def node(name, role, host, extra=(), bootstrap=None):
            mdns = discovery == "mdns"
            args = [*extra, *(["--mdns-interface", host.addr] if mdns else [])]
            return cluster.node(name, role, host=host.addr, prefix=host.exec_prefix, mdns=mdns, extra=args,
                                bootstrap=None if mdns else bootstrap)

        s = node("s", "server", h0, ["--p2p", "--federated", "--threads", "1"])
        f = node("f", "federated", h1, bootstrap=[s])
        w = node("w", "worker", h2, bootstrap=[s])
        wait_for(lambda: s.alive_peer_names() == {"f", "w"} and f.alive_peer_names() == {"s", "w"}
                 and w.alive_peer_names() == {"s", "f"}, 45, 0.1, what=f"three hosts to find each other ({discovery})")
        for n, h in ((s, h0), (f, h1), (w, h2)):
            gossip = {p["name"]: p["endpoints"]["gossip"] for p in n.peers()}
            assert all(e.startswith("tcp://10.213.") for e in gossip.values()), gossip
        server_id = s.node_id()
        wait_for(lambda: any(r["node"] == server_id and MODEL in r["models"]
                             for r in f.admin("status")["gateway"]["routes"]),
                 60, 0.2, what="the entry point to route to the server's model")
        # the client runs on the worker's host; the entry point is on another; the model on a third
        r = h2.run([sys.executable, "-c", CLIENT, f"http://{h1.addr}:8080", MODEL], capture_output=True, text=True,
                   timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        answer = json.loads(r.stdout)
        assert answer["node"] == server_id and answer["content"]
        cluster.close()
