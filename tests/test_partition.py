"""Partitions and bad links between real nodes, in network namespaces: how fast the cluster heals.

The lab: three hosts on one bridge. ``f`` is an entry point (``zswarm federated``, no model);
``s1`` and ``s2`` are federated servers with the real model (``s2`` bootstraps from ``s1``, and
``f`` from ``s1``, so ``f`` and ``s2`` know each other only by peer exchange). Faults are made on
``s2``'s link: a partition drops every frame at its bridge port (nftables), loss drops one frame
in ten there, and delay is a user-space proxy in its namespace (the kernel has no netem). A
steady load of whole and streamed requests (tests/loadgen.py, run inside ``f``'s namespace)
crosses ``f`` the whole time.

A lost request is a non-streamed one that got a 5xx other than a clean 503 (an OpenAI-shaped
error a client may retry), or no answer at all. The figures are printed (``pytest -s``) and
recorded in docs/RELIABILITY.md, "Partitions and bad links".
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import delayproxy
from cluster import REPO, Cluster, NodeProc, wait_for
from netns import Host, NetnsLab, netns_available, nft_available
from zswarm.token import Token

pytestmark = [pytest.mark.slow, pytest.mark.netns]

MODEL = "smollm2-135m-instruct"
SERVER_ARGS = ["--p2p", "--federated", "--threads", "1"]
HEAL_WITHIN_S = 3.0  # issue 11: after a partition of any length, routes return within 3 s of the heal
GOSSIP_PORT, GATEWAY_PORT = 7340, 7341  # a node in a lab namespace listens on these
PROXY_PORT = 17341


@dataclass
class Lab:
    net: NetnsLab
    cluster: Cluster
    f: NodeProc
    s1: NodeProc
    s2: NodeProc
    tmp: Path

    @property
    def nodes(self) -> tuple[NodeProc, ...]:
        return (self.f, self.s1, self.s2)

    @property
    def s2_host(self) -> Host:
        return self.net.hosts[2]

    def id(self, node: NodeProc) -> str:
        if node.name not in self._ids:
            self._ids[node.name] = node.node_id()
        return self._ids[node.name]

    def __post_init__(self) -> None:
        self._ids: dict[str, str] = {}


def states(node: NodeProc) -> dict[str, str]:
    """What ``node`` says of each peer, by name."""
    return {p["name"]: p["state"] for p in node.peers()}


def routes(entry: NodeProc) -> set[str]:
    return {r["node"] for r in entry.admin("status")["gateway"]["routes"] if MODEL in r["models"]}


def whole(lab: Lab) -> bool:
    names = {n.name for n in lab.nodes}
    return (all({k for k, v in states(n).items() if v == "alive"} == names - {n.name} for n in lab.nodes)
            and routes(lab.f) == {lab.id(lab.s1), lab.id(lab.s2)})


def wait_whole_for(lab: Lab, hold_s: float, timeout_s: float, what: str) -> None:
    """Wait until the cluster has been whole for ``hold_s`` without a break (a moment of "whole"
    right after links were reset only means nobody has noticed the silence yet)."""
    deadline = time.monotonic() + timeout_s
    since = None
    while time.monotonic() < deadline:
        try:
            ok = whole(lab)
        except Exception:  # an admin call that timed out
            ok = False
        now = time.monotonic()
        since = (since or now) if ok else None
        if since is not None and now - since >= hold_s:
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (whole for {hold_s} s)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = netns_available() or nft_available()
    if reason:
        pytest.fail(f"network namespaces and nftables are needed for this test: {reason}")
    tmp = tmp_path_factory.mktemp("partition")
    with NetnsLab(3, prefix="zspart") as net:
        h0, h1, h2 = net.hosts
        c = Cluster(tmp, Token.generate().encode())
        try:
            s1 = c.node("s1", "server", host=h1.addr, prefix=h1.exec_prefix, extra=SERVER_ARGS)
            s2 = c.node("s2", "server", bootstrap=[s1], host=h2.addr, prefix=h2.exec_prefix, extra=SERVER_ARGS)
            f = c.node("f", "federated", bootstrap=[s1], host=h0.addr, prefix=h0.exec_prefix)
            lab = Lab(net, c, f, s1, s2, tmp)
            wait_for(lambda: whole(lab), 120, 0.2, what="both servers routable from the entry point")
            yield lab
        finally:
            c.close()


class Load:
    """tests/loadgen.py inside the entry point's namespace."""

    def __init__(self, lab: Lab, name: str, plain: int = 2, stream: int = 1):
        self.out = lab.tmp / f"{name}.jsonl"
        url = f"http://{lab.f.args[lab.f.args.index('--address') + 1]}"
        self.proc = lab.net.hosts[0].popen(
            [sys.executable, str(REPO / "tests" / "loadgen.py"), url, MODEL, str(self.out),
             "--plain", str(plain), "--stream", str(stream)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "started"

    def records(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def stop(self) -> list[dict]:
        self.proc.terminate()
        self.proc.wait(150)
        return self.records()


def lost(rec: dict) -> bool:
    """No answer, or a 5xx that is not a clean 503 (a client retries a 503 with an error body)."""
    status = rec["status"]
    return status is None or (status >= 500 and not (status == 503 and rec["code"]))


def tally(recs: list[dict]) -> dict:
    plain = [r for r in recs if r["kind"] == "plain"]
    stream = [r for r in recs if r["kind"] == "stream"]
    return {
        "plain": len(plain),
        "plain_ok": sum(r["status"] == 200 for r in plain),
        "plain_clean_503": sum(r["status"] == 503 and bool(r["code"]) for r in plain),
        "plain_lost": sum(lost(r) for r in plain),
        "stream": len(stream),
        "stream_ok": sum(r["status"] == 200 and r["done"] for r in stream),
        "stream_cut": sum(r["status"] == 200 and not r["done"] for r in stream),
        "stream_lost": sum(lost(r) for r in stream),
    }


def first_times(t0: float, checks: dict, timeout_s: float) -> dict[str, float | None]:
    """Poll every check until each has been true once; seconds from ``t0`` to its first success."""
    found: dict[str, float | None] = {k: None for k in checks}
    deadline = t0 + timeout_s
    while any(v is None for v in found.values()) and time.monotonic() < deadline:
        for name, check in checks.items():
            if found[name] is None:
                try:
                    ok = check()
                except Exception:  # an admin call that timed out: the node is busy, ask again
                    ok = False
                if ok:
                    found[name] = round(time.monotonic() - t0, 2)
        time.sleep(0.05)
    return found


def partition(lab: Lab, load: Load, seconds: float) -> dict:
    """Cut s2 off for ``seconds``, heal, and time the way back."""
    f, s1, s2 = lab.nodes
    s2_id = lab.id(s2)
    wait_for(lambda: whole(lab), 30, 0.2, what="the cluster whole before the partition")
    t_cut = time.monotonic()
    lab.net.cut(lab.s2_host)
    # the partition bites: the entry point stops routing to s2 and, in time, gives it up
    wait_for(lambda: s2_id not in routes(f), 10, 0.1, what="f to stop routing to s2")
    while time.monotonic() < t_cut + seconds:
        time.sleep(0.1)
    before = {"f_sees_s2": states(f).get("s2", "removed"), "s2_sees": states(s2)}
    t_heal = time.monotonic()
    lab.net.mend(lab.s2_host)
    checks = {
        "f_sees_s2": lambda: states(f).get("s2") == "alive",
        "s1_sees_s2": lambda: states(s1).get("s2") == "alive",
        "s2_sees_f_and_s1": lambda: {k for k, v in states(s2).items() if v == "alive"} >= {"f", "s1"},
        "f_routes_to_s2": lambda: s2_id in routes(f),
        "s2_serves_via_f": lambda: any(r["node"] == s2_id and r["status"] == 200 and r["t1"] > t_heal
                                       for r in load.records()),
    }
    found = first_times(t_heal, checks, 120)
    redials = {n.name: n.admin("status")["counters"].get("gossip_redials", 0) for n in lab.nodes}
    return {"partition_s": seconds, "states_at_heal": before, "heal_to_s": found, "redials_so_far": redials}


def test_partition_of_20_and_40_s_heals_within_3_s(lab):
    load = Load(lab, "partition")
    try:
        wait_for(lambda: sum(r["status"] == 200 for r in load.records()) >= 3, 60, 0.2, what="the load to flow")
        results = [partition(lab, load, 20), partition(lab, load, 40)]
    finally:
        recs = load.stop()
    figures = {"partitions": results, "requests": tally(recs)}
    print("\nPARTITION FIGURES", json.dumps(figures, indent=1))
    (lab.tmp / "partition-figures.json").write_text(json.dumps(figures, indent=1))
    for r in results:
        assert r["states_at_heal"]["f_sees_s2"] in ("dead", "removed"), r  # the partition did bite
        slow = {k: v for k, v in r["heal_to_s"].items() if v is None or v > HEAL_WITHIN_S}
        assert not slow, f"after a {r['partition_s']} s partition, took longer than {HEAL_WITHIN_S} s: {slow}"
    assert figures["requests"]["plain_lost"] == 0, [r for r in recs if r["kind"] == "plain" and lost(r)]
    # during 40 s the entry point buried s2: after the heal s2's own beats were believed at once
    assert results[1]["states_at_heal"]["f_sees_s2"] == "removed"


def test_delay_and_loss_on_one_link_make_no_false_verdicts(lab):
    """200 ms each way (a proxy) and 1 frame in 10 lost each way (nftables) on s2's link."""
    h2 = lab.s2_host
    names = {n.name for n in lab.nodes}
    wait_for(lambda: whole(lab), 30, 0.2, what="the cluster whole before the bad link")
    proxy = h2.popen([sys.executable, str(REPO / "tests" / "delayproxy.py"), str(PROXY_PORT), "200"],
                     stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout.readline().strip() == "ready"
        h2.nft(delayproxy.rules(h2.addr, [GOSSIP_PORT, GATEWAY_PORT], PROXY_PORT))
        lab.net.lossy(h2, 10)
        # s2's links, opened before the rules, are reset so that they come back over the slow path.
        # Not part of the scenario: re-opening every link of a node at once over this path takes
        # seconds (TCP's first RTO is 1 s, a CURVE handshake about 4 round trips), and once took
        # long enough for a dead verdict; the window starts once the cluster has stayed whole
        # longer than dead_after_s.
        ports = " or ".join(f"{d}port = :{p}" for d in "sd" for p in (GOSSIP_PORT, GATEWAY_PORT))
        h2.run(["ss", "-K", "-t", "state", "established", f"( {ports} )"], check=True, capture_output=True)
        wait_whole_for(lab, 6, 60, what="the cluster whole again over the bad link")
        logs = {n.name: len(n.log()) for n in lab.nodes}
        load = Load(lab, "badlink")
        t0 = time.monotonic()
        seen: dict[str, dict[str, int]] = {n.name: {} for n in lab.nodes}  # node -> state or "missing" -> polls
        polls = 0
        try:
            while time.monotonic() < t0 + 40:
                for n in lab.nodes:
                    try:
                        st = states(n)
                    except Exception:
                        continue  # an admin call that timed out says nothing about the peers
                    for peer in names - {n.name}:
                        s = st.get(peer, "missing")
                        seen[n.name][s] = seen[n.name].get(s, 0) + 1
                polls += 1
                time.sleep(0.25)
        finally:
            recs = load.stop()
        dropped, passed = lab.net.loss_counts(h2)
    finally:
        for undo in (lambda: lab.net.clear_loss(h2), lambda: h2.nft("delete table ip zs_delay\n")):
            try:
                undo()
            except RuntimeError:
                pass
        proxy.terminate()
        carried = proxy.communicate(timeout=10)[0].strip()
    lines = {n.name: n.log()[logs[n.name]:].splitlines() for n in lab.nodes}
    verdicts = {name: [line for line in ls if "-> dead" in line or "-> removed" in line] for name, ls in lines.items()}
    suspicions = {name: sum("-> suspect" in line for line in ls) for name, ls in lines.items()}
    s2_id = lab.id(lab.s2)

    def served(node: str) -> list[float]:
        return [r["t1"] - r["t0"] for r in recs if r["kind"] == "plain" and r["status"] == 200 and r["node"] == node]
    figures = {
        "polls": polls, "states_seen": seen, "verdicts_in_logs": verdicts, "suspicions_in_logs": suspicions,
        "requests": tally(recs),
        "plain_served_by_s2": len(served(s2_id)),
        "median_plain_s": {"s1": round(statistics.median(served(lab.id(lab.s1)) or [0]), 3),
                           "s2": round(statistics.median(served(s2_id) or [0]), 3)},
        "frames_dropped": dropped, "frames_passed": passed, "proxy": carried,
    }
    print("\nBAD LINK FIGURES", json.dumps(figures, indent=1))
    (lab.tmp / "badlink-figures.json").write_text(json.dumps(figures, indent=1))
    assert dropped > 0 and int(carried.split()[1]) >= 5, figures  # the link was bad, and the nodes used it
    false = {n: {s: k for s, k in st.items() if s in ("dead", "missing")} for n, st in seen.items()}
    assert not any(false.values()), f"false verdicts: {false}"
    assert not any(verdicts.values()), verdicts
    t = figures["requests"]
    assert t["plain"] > 0 and t["plain_ok"] == t["plain"], [r for r in recs if r["status"] != 200]
    # a stream can only be cut where the entry point suspected its node for a moment (a 2-3 s TCP
    # stall: a segment and its retransmission both lost; the balancer drops a suspect's routes);
    # then it ends with a clean error, and a whole answer is retried by the entry point
    cut_ok = suspicions["f"] > 0 and t["stream_cut"] <= 1 and t["stream_lost"] == 0
    assert t["stream_ok"] == t["stream"] or cut_ok, [r for r in recs if r["kind"] == "stream" and not r["done"]]
    assert figures["plain_served_by_s2"] >= 3, figures
