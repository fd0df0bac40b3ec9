"""mDNS discovery between two hosts: network namespaces joined by a bridge, no bootstrap.

Multicast never leaves the test's own namespaces: each node binds zeroconf to its namespace's
address (``--mdns-interface``), and the namespaces' only link is the lab's bridge.
"""

import pytest

from cluster import wait_for
from netns import NetnsLab, netns_available
from zswarm.token import Token

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
