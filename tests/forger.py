"""A member gone bad: a process that holds the cluster token and forges gossip (issue 13).

It is what a lost laptop, or any machine that once joined, can do: open a CURVE connection to
every node's gossip SUB and publish well-formed wire messages about other nodes. Used by
tests/test_forgery.py as a library; ``python tests/forger.py --help`` runs it by hand.

It speaks whichever protocol ``zswarm.wire`` speaks. Where the wire carries signatures
(protocol 2: ``NodeRecord.key/curve/sig``, ``Beat/DigestEntry/Leave.sig``) it signs with the
statements ``wire.record_statement``/``beat_statement``/``leave_statement``, so that what it
signs with a key it holds is exactly what a node checks; where it does not (protocol 1), the
same forgeries go out unsigned, which is what proves the tests fail on a cluster without
signed membership. Fields a struct lacks are left out, never guessed.

Its transport key is its own (derived from its own :class:`~zswarm.identity.Identity`, so the
``curve`` of the record it announces for itself is the key it really connects with); a cluster
whose ZAP admits only the token's key pair (protocol 1) refuses that handshake, and the forger
then connects again with the token's key pair, as every node of that cluster does.

Nothing here touches a node except through its gossip port.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Iterable

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

if __name__ == "__main__":  # run by hand: this checkout's zswarm, as tests/cluster.py gives the nodes
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zswarm import wire  # noqa: E402
from zswarm.identity import Identity  # noqa: E402
from zswarm.token import Token  # noqa: E402

HUGE_INCARNATION = 2**62  # beats any real incarnation (a start time in microseconds, ~2**51)
HUGE_HEARTBEAT = 10**12
HANDSHAKE_WAIT_S = 3.0
SETTLE_S = 0.3  # after the handshake: the SUB's subscription must reach our PUB (slow joiner)
_AUTH_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

Sent = tuple[str, Any]  # (envelope sender, body)


# --- building messages, signed where the protocol signs ---

def signed_protocol() -> bool:
    """Does this checkout's wire carry signatures?"""
    return "sig" in getattr(wire.NodeRecord, "__struct_fields__", ())


def _build(cls: type, **fields: Any) -> Any:
    """``cls(**fields)`` minus the fields this protocol's struct does not have."""
    known = set(cls.__struct_fields__)
    return cls(**{k: v for k, v in fields.items() if k in known})


def record_statement(rec: wire.NodeRecord) -> bytes:
    if hasattr(wire, "record_statement"):
        return wire.record_statement(rec)
    return msgspec.msgpack.encode(msgspec.structs.replace(rec, sig=b""))


def beat_statement(node_id: str, incarnation: int, version: int, heartbeat: int) -> bytes:
    if hasattr(wire, "beat_statement"):
        return wire.beat_statement(node_id, incarnation, version, heartbeat)
    return msgspec.msgpack.encode([b"beat", node_id, incarnation, version, heartbeat])


def leave_statement(node_id: str, incarnation: int) -> bytes:
    if hasattr(wire, "leave_statement"):
        return wire.leave_statement(node_id, incarnation)
    return msgspec.msgpack.encode([b"leave", node_id, incarnation])


def _sig(signer: Identity | None, statement: Any) -> bytes:
    """``signer``'s signature (b"" for an unsigned forgery or on a protocol without signatures)."""
    if signer is None or not signed_protocol():
        return b""
    return signer.sign(statement())


def leave(node_id: str, incarnation: int, signer: Identity | None = None) -> wire.Leave:
    return _build(wire.Leave, id=node_id, incarnation=incarnation,
                  sig=_sig(signer, lambda: leave_statement(node_id, incarnation)))


def beat(node_id: str, incarnation: int, version: int, heartbeat: int, gossip: str,
         signer: Identity | None = None) -> wire.Beat:
    return _build(wire.Beat, id=node_id, incarnation=incarnation, version=version, heartbeat=heartbeat,
                  gossip=gossip, sig=_sig(signer, lambda: beat_statement(node_id, incarnation, version, heartbeat)))


def digest_entry(node_id: str, incarnation: int, version: int, heartbeat: int,
                 signer: Identity | None = None) -> wire.DigestEntry:
    return _build(wire.DigestEntry, id=node_id, incarnation=incarnation, version=version, heartbeat=heartbeat,
                  sig=_sig(signer, lambda: beat_statement(node_id, incarnation, version, heartbeat)))


def record(signer: Identity | None = None, **fields: Any) -> wire.NodeRecord:
    """A NodeRecord of ``fields`` (those this protocol has), signed by ``signer`` over its
    statement; ``key``/``curve`` are whatever ``fields`` says (the signer's need not match)."""
    rec = _build(wire.NodeRecord, **fields)
    if signer is not None and signed_protocol():
        rec = msgspec.structs.replace(rec, sig=b"")
        rec = msgspec.structs.replace(rec, sig=signer.sign(record_statement(rec)))
    return rec


def own_record(ident: Identity, gossip: str, role: str = "worker", name: str = "",
               **extra: Any) -> wire.NodeRecord:
    """A VALID record for ``ident``'s node: its id derived from its key, signed by it."""
    fields = dict(id=ident.node_id, name=name or "fake-" + ident.node_id[:6], role=role,
                  incarnation=time.time_ns() // 1000, version=1, endpoints={"gossip": gossip},
                  key=ident.public, curve=ident.curve_public.decode(), started_at=time.time())
    return record(ident, **(fields | extra))


def impersonation(victim: dict, me: Identity, elsewhere: str = "tcp://127.0.0.1:9") -> list[Sent]:
    """Attacks (a), (b), (c) on ``victim`` (its record as ``zswarm admin ledger`` shows it), each
    unsigned, signed by the forger's key and, where the victim's key is known, mis-signed under
    it. Envelope senders are the victim's id (as the victim would send) and the forger's."""
    base = msgspec.convert(victim, wire.NodeRecord)  # admin JSON carries bytes as base64
    vid, inc, ver = base.id, base.incarnation, base.version
    signers: list[Identity | None] = [None, me]
    out: list[Sent] = []
    senders = (vid, me.node_id)
    # (a) the victim leaves, at its own incarnation and at higher ones
    for s in signers:
        for i in (inc, inc + 1, HUGE_INCARNATION):
            out += [(snd, leave(vid, i, s)) for snd in senders]
    # (b) the victim's record taken over: endpoints elsewhere, memory 2**60, huge incarnation
    taken = msgspec.structs.asdict(base) | {
        # one above the forged Leaves' incarnation, so the tombstone they leave does not bury it
        "incarnation": HUGE_INCARNATION + 1, "version": ver + 1000, "mem_total": 2**60, "mem_free": 2**60,
        "endpoints": {**base.endpoints, "tunnel": elsewhere, "gateway": elsewhere, "gossip": elsewhere}}
    variants = [record(None, **(taken | {"sig": b""})),  # unsigned
                record(me, **(taken | {"key": me.public, "curve": me.curve_public.decode()})),  # forger's key
                record(me, **taken)]  # the victim's own key, the forger's signature
    out += [(snd, wire.Records([r])) for r in variants for snd in senders]
    # (c) beats in the victim's name, far ahead, direct and relayed in a digest
    for s in signers:
        for i in (inc, HUGE_INCARNATION):
            out.append((vid, beat(vid, i, ver + 1000, HUGE_HEARTBEAT, elsewhere, s)))
            out.append((me.node_id, wire.Digest([digest_entry(vid, i, ver + 1000, HUGE_HEARTBEAT, s)])))
    return out


def fake_nodes(n: int, ports: Iterable[int], role: str = "worker") -> list[tuple[Identity, wire.NodeRecord]]:
    """``n`` fake nodes, each with its own identity and a validly signed record whose gossip
    endpoint is a 127.0.0.1 port from ``ports`` (ports nobody listens on)."""
    out = []
    ports = iter(ports)
    for _ in range(n):
        ident = Identity.generate()
        out.append((ident, own_record(ident, f"tcp://127.0.0.1:{next(ports)}", role=role)))
    return out


def flood(fakes: list[tuple[Identity, wire.NodeRecord]], relay: Identity, batch: int = 50) -> list[Sent]:
    """Everything one connection can say for the fakes: their records in batches, a digest of
    their (validly signed) heartbeats, and a beat each in its own name, all from ``relay``'s one
    connection (a fake cannot be heard directly: nobody listens on its gossip port)."""
    out: list[Sent] = []
    recs = [r for _, r in fakes]
    for i in range(0, len(recs), batch):
        out.append((relay.node_id, wire.Records(recs[i:i + batch])))
    entries = [digest_entry(r.id, r.incarnation, r.version, 1, ident) for ident, r in fakes]
    for i in range(0, len(entries), 200):
        out.append((relay.node_id, wire.Digest(entries[i:i + 200])))
    out += [(r.id, beat(r.id, r.incarnation, r.version, 1, r.endpoints["gossip"], ident)) for ident, r in fakes]
    return out


# --- the connection ---

class Forger:
    """One PUB to every endpoint in ``endpoints`` (``tcp://host:port`` gossip endpoints)."""

    def __init__(self, token: str, endpoints: Iterable[str], ctx: zmq.Context | None = None):
        self.keys = Token.parse(token).derive()
        self.endpoints = [e if e.startswith("tcp://") else "tcp://" + e for e in endpoints]
        self.ident = Identity.generate()
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.client_key = ""  # "own" or "token": the key pair the nodes admitted
        self.reached: set[str] = set()  # endpoints whose handshake succeeded
        self.sent = 0
        self._pub: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None

    @property
    def node_id(self) -> str:
        return self.ident.node_id

    def open(self, timeout_s: float = HANDSHAKE_WAIT_S) -> "Forger":
        """Connect with the forger's own key pair; if any node refuses it, with the token's."""
        ok, refused = self._connect(self.ident.curve_public, self.ident.curve_secret, timeout_s)
        self.client_key = "own"
        if refused or not ok:
            self._close_sockets()
            ok, refused = self._connect(self.keys.curve_public, self.keys.curve_secret, timeout_s)
            self.client_key = "token"
        self.reached = ok
        if not ok:
            raise ConnectionError(f"no node admitted the forger (refused: {sorted(refused)})")
        time.sleep(SETTLE_S)
        return self

    def _connect(self, public: bytes, secret: bytes, timeout_s: float) -> tuple[set[str], set[str]]:
        pub = self.ctx.socket(zmq.PUB)
        pub.linger = 0
        pub.sndhwm = 0  # a flood is the point: nothing dropped on our side
        pub.curve_publickey, pub.curve_secretkey = public, secret
        pub.curve_serverkey = self.keys.curve_public
        mon = pub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | _AUTH_FAILED)
        self._pub, self._mon = pub, mon
        for e in self.endpoints:
            pub.connect(e)
        ok: set[str] = set()
        refused: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while len(ok | refused) < len(self.endpoints) and time.monotonic() < deadline:
            if not mon.poll(50):
                continue
            ev = recv_monitor_message(mon)
            endpoint = ev["endpoint"].decode(errors="replace")
            if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                ok.add(endpoint)
                refused.discard(endpoint)
            elif endpoint not in ok:
                refused.add(endpoint)
        return ok, refused

    def send(self, sender: str, body: Any, topic: bytes = wire.TOPIC_ALL) -> None:
        assert self._pub is not None, "open() first"
        self._pub.send_multipart([topic, wire.encode(self.keys.network_id, sender, body)])
        self.sent += 1

    def announce(self, gossip: str = "tcp://127.0.0.1:9") -> list[Sent]:
        """The forger as an ordinary member: its own valid record and beat."""
        rec = own_record(self.ident, gossip, role="worker", name="forger")
        return [(self.node_id, wire.Records([rec])),
                (self.node_id, beat(self.node_id, rec.incarnation, rec.version, 1, gossip, self.ident))]

    def barrage(self, messages: list[Sent], rounds: int = 4, over_s: float = 2.0) -> None:
        """Send ``messages`` ``rounds`` times, spread over ``over_s`` (a PUB drops what reaches a
        subscriber before its subscription, and a node's SUB drops beyond its queue)."""
        for k in range(rounds):
            t0 = time.monotonic()
            for sender, body in messages:
                self.send(sender, body)
            if k + 1 < rounds:
                time.sleep(max(0.0, over_s / max(1, rounds - 1) - (time.monotonic() - t0)))

    def _close_sockets(self) -> None:
        for s in (self._mon, self._pub):
            if s is not None:
                s.close(linger=0)
        self._pub = self._mon = None

    def close(self) -> None:
        self._close_sockets()
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> "Forger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--token", default=os.environ.get("ZSWARM_TOKEN", ""))
    p.add_argument("--connect", required=True, help="gossip endpoints host:port, comma-separated")
    p.add_argument("--victim-state-dir", help="a node's state dir: impersonate the first peer of its ledger")
    p.add_argument("--victim", help="the victim's node id (with --victim-state-dir)")
    p.add_argument("--flood", type=int, default=0, help="this many fake nodes")
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args(argv)
    with Forger(a.token, a.connect.split(",")) as f:
        f.open()
        print(f"forger {f.node_id}: reached {sorted(f.reached)} with the {f.client_key} key pair", file=sys.stderr)
        msgs = f.announce()
        if a.victim_state_dir:
            from zswarm.admin_client import call

            ledger = call(a.victim_state_dir, "ledger", {}, timeout_s=3.0)
            victim = next(r for r in ledger[1:] if not a.victim or r["id"] == a.victim)
            msgs += impersonation(victim, f.ident)
        if a.flood:
            msgs += flood(fake_nodes(a.flood, range(40000, 40000 + a.flood)), f.ident)
        f.barrage(msgs, rounds=a.rounds)
        print(f"sent {f.sent} messages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
