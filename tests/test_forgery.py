"""Issue 13's acceptance: a member that holds the token cannot speak for another node, and
cannot flood the cluster with nodes of its own making. The attacker is tests/forger.py, over
its own CURVE connection to every node's gossip port, with real node processes on 127.0.0.1."""

import os
import time

import msgspec
import openai
import pytest

from cluster import wait_for
import forger as forgery
from forger import Forger, fake_nodes, flood, impersonation
from zswarm import identity, wire

MODEL = "smollm2-135m-instruct"
WATCH_S = 6.0  # how long after the attack began the victim must stay untouched
UNUSED_PORTS = range(61001, 62001)  # above the kernel's ephemeral range (32768-60999): nobody listens
FD_SLACK = 200


def per_sender_cap() -> int:
    """The cap on nodes learned through one sender and not heard directly (64 by default)."""
    try:
        from zswarm.trust import PER_SENDER
        return PER_SENDER
    except ImportError:  # a checkout without the cap: the default
        return 64


def gossip(node):
    return f"tcp://{node.endpoint}"


def ledger_of(node):
    return {r["id"]: r for r in node.admin("ledger")}


def fingerprint(rec):
    return rec["incarnation"], rec["endpoints"], rec["mem_total"]


def counter(node, name):
    return node.admin("status")["counters"].get(name, 0)


def first_sightings(violations):
    """One line per distinct violation, with when it was first seen."""
    first: dict[str, str] = {}
    for at, what in violations:
        first.setdefault(what, at)
    return "\n".join(f"{at}: {what}" for what, at in list(first.items())[:30])


def descriptors(node):
    return len(os.listdir(f"/proc/{node.proc.pid}/fd"))


@pytest.mark.skipif(not forgery.signed_protocol(), reason="this wire carries no signatures (protocol 1)")
def test_the_forgers_own_fakes_are_valid_and_its_impersonations_are_not():
    """Test 2 must be refused by the cap, not by a bad signature: the fakes verify."""
    (ident, rec), = fake_nodes(1, [61000])
    assert identity.node_id_of(rec.key) == rec.id and rec.curve == ident.curve_public.decode()
    assert identity.verify(rec.key, rec.sig, wire.record_statement(rec))
    b = forgery.beat(rec.id, rec.incarnation, rec.version, 7, rec.endpoints["gossip"], ident)
    assert identity.verify(rec.key, b.sig, wire.beat_statement(rec.id, rec.incarnation, rec.version, 7))
    victim = msgspec.to_builtins(forgery.own_record(identity.Identity.generate(), "tcp://127.0.0.1:1"))
    me = identity.Identity.generate()
    for _, body in impersonation(victim, me):
        for r in getattr(body, "records", []):
            assert not identity.verify(msgspec.convert(victim["key"], bytes), r.sig, wire.record_statement(r))


@pytest.mark.slow
def test_forged_leave_record_and_beats_leave_the_victim_untouched(cluster, token):
    v = cluster.node("v", "worker")
    w = cluster.node("w", "worker", bootstrap=[v])
    e = cluster.node("e", "federated", bootstrap=[v])
    nodes = [v, w, e]
    vid = v.node_id()
    others = [w, e]

    def converged():
        own = v.admin("ledger")[0]
        if "tunnel" not in own["endpoints"]:
            return None
        for n in others:
            peer = {p["id"]: p for p in n.peers()}.get(vid)
            rec = ledger_of(n).get(vid)
            if not peer or peer["state"] != "alive" or not rec or fingerprint(rec) != fingerprint(own):
                return None
        return own
    victim = wait_for(converged, 20, 0.1, what="every node to hold the victim's record")
    before = fingerprint(victim)

    with Forger(token, [gossip(n) for n in nodes]) as forger:
        forger.open()
        assert forger.reached == {gossip(n) for n in nodes}, f"the forger reached only {forger.reached}"
        attack = forger.announce() + impersonation(victim, forger.ident)
        start = time.monotonic()
        forger.barrage(attack, rounds=1)  # at once, then again while we watch
        violations: list[tuple[str, str]] = []
        next_round, rounds_left = start + 0.6, 4
        while time.monotonic() - start < WATCH_S:
            if rounds_left and time.monotonic() >= next_round:
                forger.barrage(attack, rounds=1)
                next_round, rounds_left = next_round + 0.6, rounds_left - 1
            at = f"{time.monotonic() - start:.1f} s"
            own = v.admin("ledger")[0]
            if fingerprint(own) != before:
                violations.append((at, f"the victim's own record changed to {fingerprint(own)}"))
            for n in others:
                peer = {p["id"]: p for p in n.peers()}.get(vid)
                rec = ledger_of(n).get(vid)
                if peer is None or rec is None:
                    violations.append((at, f"{n.name} no longer lists the victim"))
                    continue
                if peer["state"] != "alive":
                    violations.append((at, f"{n.name} holds the victim {peer['state']}"))
                if fingerprint(rec) != before:
                    violations.append((at, f"{n.name} holds a forged record for the victim: "
                                      f"incarnation {rec['incarnation']}, endpoints {rec['endpoints']}, "
                                      f"mem_total {rec['mem_total']}"))
            time.sleep(0.2)
    assert not violations, (f"forgeries taken for the victim (client key: {forger.client_key}; "
                            f"{len(violations)} sightings; each first seen at):\n" + first_sightings(violations))
    uncounted = {n.name: counter(n, "gossip_forged") for n in nodes if gossip(n) in forger.reached}
    assert all(uncounted.values()), f"forgeries not counted as gossip_forged: {uncounted}"


@pytest.mark.slow
def test_a_thousand_fake_nodes_from_one_member(cluster, token):
    s = cluster.node("s", "server", extra=["--p2p", "--federated", "--threads", "1"])
    e = cluster.node("e", "federated", bootstrap=[s])
    nodes = [s, e]
    fakes = fake_nodes(1000, UNUSED_PORTS)  # while the model loads
    wait_for(lambda: [r for r in e.admin("status")["gateway"]["routes"] if MODEL in r["models"]], 60, 0.2,
             what="the server routable from the entry point")
    api = openai.OpenAI(base_url=f"http://{e.args[e.args.index('--address') + 1]}/v1", api_key="none",
                        max_retries=0, timeout=30)
    api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    baseline = {n.name: descriptors(n) for n in nodes}
    cap = per_sender_cap() + (len(nodes) - 1) + 1  # the fakes' share, the real peers, the forger itself

    with Forger(token, [gossip(n) for n in nodes]) as forger:
        forger.open()
        assert forger.reached == {gossip(n) for n in nodes}, f"the forger reached only {forger.reached}"
        attack = forger.announce() + flood(fakes, forger.ident)
        start = time.monotonic()
        violations: list[tuple[str, str]] = []
        worst = {n.name: (0, 0) for n in nodes}  # peers, descriptors
        rounds_left, next_round = 3, start
        while time.monotonic() - start < WATCH_S:
            if rounds_left and time.monotonic() >= next_round:
                forger.barrage(attack, rounds=1)
                next_round, rounds_left = next_round + 1.0, rounds_left - 1
            at = f"{time.monotonic() - start:.1f} s"
            for n in nodes:
                fds = descriptors(n)
                try:
                    peers = len(n.peers())
                except Exception as exc:  # a node too busy to answer its operator is a failure too
                    violations.append((at, f"{n.name} did not answer 'peers': {exc}"))
                    peers = -1
                worst[n.name] = (max(worst[n.name][0], peers), max(worst[n.name][1], fds))
                if peers > cap:
                    violations.append((at, f"{n.name} lists over {cap} peers (cap {cap})"))
                if fds >= baseline[n.name] + FD_SLACK:
                    violations.append((at, f"{n.name} holds {FD_SLACK}+ descriptors more than before"))
            time.sleep(0.3)
        t0 = time.monotonic()
        try:
            out = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                              max_tokens=4, temperature=0)
            answered = f"answered in {time.monotonic() - t0:.1f} s: {out.choices[0].finish_reason}"
            assert out.choices and out.choices[0].finish_reason in ("stop", "length"), answered
        except openai.OpenAIError as exc:
            violations.append(("after", f"the entry point did not route a chat completion: {exc!r}"))
    assert not violations, (f"worst (peers, descriptors) {worst}, baseline descriptors {baseline}; "
                            f"client key {forger.client_key}:\n" + first_sightings(violations))
    capped = {n.name: counter(n, "members_capped") for n in nodes}
    assert all(capped.values()), f"refusals not counted as members_capped: {capped}"
