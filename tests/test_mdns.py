"""mDNS discovery between two hosts: network namespaces joined by a bridge, no bootstrap.

Multicast never leaves the test's own namespaces: each node binds zeroconf to its namespace's
address (``--mdns-interface``), the attacker (``mdns_spoof.py``) to its own namespace's, and the
namespaces' only link is the lab's bridge.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import wait_for
from netns import NetnsLab, netns_available
from zswarm.token import Token

SERVICE_TYPE = "_zswarm._tcp.local."

pytestmark = [pytest.mark.slow, pytest.mark.netns]


def test_two_nodes_find_each_other_by_mdns_and_ignore_other_clusters(cluster):
    reason = netns_available()
    if reason:
        pytest.fail(f"network namespaces are needed for this test: {reason}")
    with NetnsLab(3) as lab:
        h0, h1, h2 = lab.hosts
        a = cluster.node("a", host=h0.addr, prefix=h0.exec_prefix, mdns=True, extra=["--mdns-interface", h0.addr])
        b = cluster.node("b", "worker", host=h1.addr, prefix=h1.exec_prefix, mdns=True,
                         extra=["--mdns-interface", h1.addr])
        other = cluster.node("other", host=h2.addr, prefix=h2.exec_prefix, mdns=True, token=Token.generate().encode(),
                             extra=["--mdns-interface", h2.addr])
        wait_for(lambda: a.alive_peer_names() == {"b"} and b.alive_peer_names() == {"a"}, 45,
                 what="a and b to find each other by mDNS")  # zeroconf re-queries with back-off: generous on a busy host
        wait_for(lambda: a.admin("status")["counters"].get("mdns_ignored", 0) >= 1, 45,
                 what="a to ignore the other cluster's announcement")
        assert other.peers() == []
        found = a.admin("status")["discovery"]["mdns_found"]
        assert list(found.values()) == [f"tcp://{h1.addr}:{b.port}"]
        cluster.close()


class Spoofer:
    """``mdns_spoof.py`` in ``host``'s namespace: zeroconf on its address, and a TCP listener on
    ``port`` there that counts who dials it."""

    def __init__(self, host, port: int):
        self.proc = host.popen([sys.executable, str(Path(__file__).with_name("mdns_spoof.py")), host.addr, str(port)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._read() == {"ready": True}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"mdns_spoof.py exited ({self.proc.poll()})"
        return json.loads(line)

    def ask(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        assert "error" not in out, out
        return out


def ignored(node) -> dict:
    return {k: v for k, v in node.admin("status")["counters"].items() if k.startswith("mdns_ignored")}


def fast_refresh_env(tmp_path: Path, refresh_s: float) -> dict[str, str]:
    """Environment for a node that re-signs its announcement every ``refresh_s`` (not once a minute):
    a ``sitecustomize`` that sets ``announcement.REFRESH_S`` as the node's Python starts."""
    site = tmp_path / "fast-refresh"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import zswarm.announcement\nzswarm.announcement.REFRESH_S = {refresh_s}\n")
    return {"PYTHONPATH": f"{site}:{Path(__file__).resolve().parent.parent}"}


def test_replayed_and_readdressed_announcements_are_ignored_counted_and_never_dialled(cluster, tmp_path):
    reason = netns_available()
    if reason:
        pytest.fail(f"network namespaces are needed for this test: {reason}")
    with NetnsLab(3) as lab:
        h0, h1, h2 = lab.hosts
        a = cluster.node("a", host=h0.addr, prefix=h0.exec_prefix, mdns=True, extra=["--mdns-interface", h0.addr])
        b = cluster.node("b", "worker", host=h1.addr, prefix=h1.exec_prefix, mdns=True,
                         extra=["--mdns-interface", h1.addr], env=fast_refresh_env(tmp_path, 0.5))
        spoof = Spoofer(h2, b.port)  # the attacker listens where a tricked node would dial
        wait_for(lambda: a.alive_peer_names() == {"b"}, 45, what="a to find b by mDNS")
        b_id = b.node_id()
        b_endpoint = f"tcp://{h1.addr}:{b.port}"
        captured = spoof.ask("capture", name=f"{b_id}.{SERVICE_TYPE}")
        assert captured["addresses"] == [h1.addr]
        captured_ms = int(bytes.fromhex(captured["properties"][b"t".hex()]))

        # b re-signs (new time and nonce) and a takes each for news: neither a refresh nor
        # zeroconf's repeats of one announcement count as a replay.
        wait_for(lambda: a.admin("status")["discovery"]["mdns_signed_ms"].get(b_id, 0) > captured_ms + 1500, 15,
                 what="a to hear b's refreshed announcements")
        assert ignored(a) == {}

        # Re-addressed: b's signed TXT record, its A record pointing at the attacker.
        spoof.ask("register", name=f"evil1.{SERVICE_TYPE}", port=b.port, addresses=[h2.addr],
                  properties=captured["properties"])
        wait_for(lambda: ignored(a).get("mdns_ignored_readdressed", 0) >= 1, 15,
                 what="a to ignore the re-addressed announcement")
        # Replayed: the captured announcement, at b's own address, older than the latest from b.
        spoof.ask("register", name=f"evil2.{SERVICE_TYPE}", port=b.port, addresses=[h1.addr],
                  properties=captured["properties"])
        wait_for(lambda: ignored(a).get("mdns_ignored_replayed", 0) >= 1, 15,
                 what="a to ignore the replayed announcement")

        assert set(ignored(a)) == {"mdns_ignored", "mdns_ignored_readdressed", "mdns_ignored_replayed"}
        assert a.admin("status")["discovery"]["mdns_found"] == {b_id: b_endpoint}
        assert a.alive_peer_names() == {"b"}
        wait_for(lambda: b.admin("status")["counters"].get("mdns_ignored_readdressed", 0) >= 1, 15,
                 what="b to ignore the re-addressed copy of its own announcement")
        assert spoof.ask("connections") == {"connections": 0}  # nobody dialled the attacker
        cluster.close()
