"""Tests for the NetnsLab helper (tests/netns.py); need root and network namespaces."""

import subprocess
import sys

import pytest

import netns
from netns import NetnsLab, netns_available

pytestmark = pytest.mark.netns

SERVER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen()
print(s.getsockname()[1], flush=True)
c, peer = s.accept()
c.sendall(c.recv(64) + b" from " + peer[0].encode())
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.sendall(b"hello")
print(c.recv(64).decode())
"""


@pytest.fixture(autouse=True)
def _need_netns():
    reason = netns_available()
    if reason:
        pytest.skip(reason)


def _root_state():
    def ip(*args):
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    return ip("netns", "list"), ip("-o", "link"), ip("-o", "addr"), ip("route")


def test_tcp_between_hosts_and_cleanup():
    before = _root_state()
    with NetnsLab(2) as lab:
        h0, h1 = lab.hosts
        assert h0.addr != h1.addr and h0.name != h1.name
        server = h1.popen([sys.executable, "-c", SERVER, h1.addr], stdout=subprocess.PIPE, text=True)
        port = server.stdout.readline().strip()
        client = h0.run(
            [sys.executable, "-c", CLIENT, h1.addr, port],
            capture_output=True, text=True, timeout=20,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == f"hello from {h0.addr}"
        # h1's address is not reachable from the root namespace.
        assert h1.addr not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        lingering = h1.popen(["sleep", "600"])  # teardown must kill it
    assert lingering.returncode is not None
    assert _root_state() == before


def test_cleanup_after_failed_setup(monkeypatch):
    before = _root_state()
    real_ip = netns._ip

    def failing_ip(*args, **kw):
        if "224.0.0.0/4" in args and any(a.endswith("-h1") for a in args):
            raise RuntimeError("injected failure")  # host 1 half built
        return real_ip(*args, **kw)

    monkeypatch.setattr(netns, "_ip", failing_ip)
    with pytest.raises(RuntimeError, match="injected failure"):
        NetnsLab(3, prefix="zsfail")
    assert _root_state() == before
