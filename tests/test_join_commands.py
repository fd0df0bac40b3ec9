"""Issue 16: the join command a first server prints works when pasted on the same machine.

It has no --p2p-listen, so the pasted worker's default gossip port (7340) is the server's own:
it must take the next free pair and say so, not die with "Address already in use". Run in a
network namespace of the test's own (netns.py), since the default address is 0.0.0.0."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from cluster import REPO, wait_for
from netns import NetnsLab, netns_available
from zswarm.admin_client import call

pytestmark = pytest.mark.slow


@pytest.fixture
def lab():
    why = netns_available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    with NetnsLab(1, prefix="zsjoin") as lab:
        yield lab


def test_the_printed_worker_command_joins_on_the_same_machine(lab, tmp_path):
    host = lab.hosts[0]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(tmp_path / "state"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("ZSWARM_TOKEN", None)
    server_log = open(tmp_path / "server.log", "w+")
    server = host.popen([sys.executable, "-m", "zswarm", "server", "--p2p", "--threads", "1", "--address",
                         "127.0.0.1:8080"], stdout=server_log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    worker_log = open(tmp_path / "worker.log", "w+")
    worker = None
    try:
        def printed():
            text = (tmp_path / "server.log").read_text()
            return re.search(r"^\s*(ZSWARM_TOKEN=\S+ zswarm worker --bootstrap \S+)$", text, re.M)
        line = wait_for(printed, 60, 0.2, what="the server's join commands").group(1)
        argv = shlex.split(line)
        token = argv[0].split("=", 1)[1]
        assert argv[1:3] == ["zswarm", "worker"] and "--p2p-listen" not in argv
        worker = host.popen([sys.executable, "-m", "zswarm", *argv[2:]], stdout=worker_log, stderr=subprocess.STDOUT,
                            env={**env, "ZSWARM_TOKEN": token}, cwd=REPO)
        server_state = tmp_path / "state" / "zswarm" / "server"
        wait_for(lambda: any(p["role"] == "worker" and p["state"] == "alive"
                             for p in call(str(server_state), "peers", timeout_s=3.0)), 30, 0.2,
                 what="the pasted worker to join the server")
        assert worker.poll() is None
        text = (tmp_path / "worker.log").read_text()
        assert "port 7340 is in use" in text and "listening on 0.0.0.0:7342" in text, text[-2000:]
        status = call(str(tmp_path / "state" / "zswarm" / "worker"), "status", timeout_s=3.0)
        assert status["endpoints"]["gossip"].endswith(":7342")
    finally:
        for p in (worker, server):
            if p is not None and p.poll() is None:
                p.terminate()
        for p in (worker, server):
            if p is not None:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        server_log.close()
        worker_log.close()
