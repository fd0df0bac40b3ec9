"""What the ledger believes (zswarm/trust.py, pure): every statement signed by its subject, and
what one sender may add is capped."""

from collections import Counter

import msgspec

from zswarm import wire
from zswarm.identity import Identity
from zswarm.membership import Membership
from zswarm.trust import CAPPED, FORGED, Limits, Trust


def node(ident: Identity, inc: int = 1, **fields) -> wire.NodeRecord:
    rec = wire.NodeRecord(id=ident.node_id, name="n", role="worker", incarnation=inc, key=ident.public,
                          curve=ident.curve_public.decode(), **fields)
    rec.sig = ident.sign(wire.record_statement(rec))
    return rec


def beat(ident: Identity, inc: int = 1, version: int = 0, hb: int = 1, signer: Identity | None = None) -> wire.Beat:
    s = signer or ident
    return wire.Beat(ident.node_id, inc, version, hb, "tcp://127.0.0.1:1",
                     s.sign(wire.beat_statement(ident.node_id, inc, version, hb)))


class World:
    def __init__(self, limits: Limits = Limits()):
        self.me = Identity.generate()
        own = node(self.me)
        self.m = Membership(own, signer=self.me.sign)
        self.counts: Counter = Counter()
        self.t = Trust(own.id, self.m.key_of, lambda n: self.counts.update([n]), limits, self.m.held_record)

    def learn(self, rec: wire.NodeRecord, sender: str = "k") -> bool:
        ok = self.t.record(rec, sender)
        if ok:
            self.m.on_records([rec])
        return ok


def test_a_record_must_be_signed_by_the_key_its_id_comes_from():
    w, v, forger = World(), Identity.generate(), Identity.generate()
    assert w.learn(node(v))
    fake = node(v, inc=99, mem_total=2 ** 60)
    fake.sig = forger.sign(wire.record_statement(fake))  # signed, but not by v
    assert not w.t.record(fake, "k")
    other_key = msgspec.structs.replace(node(v, inc=99), key=forger.public)  # v's id with another key
    other_key.sig = forger.sign(wire.record_statement(other_key))
    assert not w.t.record(other_key, "k")
    unsigned = msgspec.structs.replace(node(v, inc=99), sig=b"")
    assert not w.t.record(unsigned, "k")
    changed = node(v, inc=2)
    changed.mem_total = 5  # altered after signing (a relay that edits)
    assert not w.t.record(changed, "k")
    assert w.counts[FORGED] == 4
    assert w.learn(node(v, inc=2))  # v's own newer record passes


def test_beats_and_leaves_in_another_nodes_name_are_refused():
    w, v, forger = World(), Identity.generate(), Identity.generate()
    w.learn(node(v))
    assert w.t.beat(beat(v, hb=5), "k")
    assert not w.t.beat(beat(v, hb=10 ** 9, signer=forger), "k")
    assert not w.t.beat(beat(v, inc=10 ** 9, hb=1, signer=forger), "k")
    leave = wire.Leave(v.node_id, 1, forger.sign(wire.leave_statement(v.node_id, 1)))
    assert not w.t.leave(leave)
    assert w.t.leave(wire.Leave(v.node_id, 1, v.sign(wire.leave_statement(v.node_id, 1))))
    assert w.counts[FORGED] == 3


def test_a_relayed_heartbeat_is_checked_only_when_it_says_something_new():
    w, v, forger = World(), Identity.generate(), Identity.generate()
    w.learn(node(v))
    w.m.on_beat(beat(v, hb=7))
    stale = wire.DigestEntry(v.node_id, 1, 0, 7, b"")  # nothing new: passes unchecked
    forged = wire.DigestEntry(v.node_id, 1, 0, 8, forger.sign(wire.beat_statement(v.node_id, 1, 0, 8)))
    reborn = wire.DigestEntry(v.node_id, 2, 0, 1, b"")  # a new incarnation must be v's own word
    real = wire.DigestEntry(v.node_id, 1, 0, 9, v.sign(wire.beat_statement(v.node_id, 1, 0, 9)))
    assert w.t.entries([stale, forged, reborn, real], "k", w.m.held) == [stale, real]
    assert w.counts[FORGED] == 2


def test_digests_relay_heartbeats_as_their_node_signed_them():
    w, v = World(), Identity.generate()
    w.learn(node(v))
    w.m.on_beat(beat(v, version=0, hb=3))
    w.m.on_records([node(v, version=4)])  # a newer record than the last beat's version
    entry = next(e for e in w.m.digest() if e.id == v.node_id)
    other = World()
    other.learn(node(v))
    assert other.t.entries([entry], "k", other.m.held) == [entry]
    mine = w.m.digest()[0]
    assert mine.id == w.me.node_id and other.t.entries([mine], "k", other.m.held) == [mine]  # unknown: a hint


def test_one_sender_introduces_at_most_its_cap_and_the_cluster_at_most_max_nodes():
    w = World(Limits(max_nodes=10, per_sender=3))
    fakes = [Identity.generate() for _ in range(6)]
    assert [w.learn(node(f), "liar") for f in fakes] == [True] * 3 + [False] * 3
    assert w.counts[CAPPED] == 3
    w.t.heard_directly(fakes[0].node_id)  # heard over its own connection: no longer the liar's
    assert w.learn(node(fakes[3]), "liar")
    honest = [Identity.generate() for _ in range(8)]
    results = [w.learn(node(h), f"k{i}") for i, h in enumerate(honest)]
    assert results.count(True) == 6  # 4 known + 6 = max_nodes
    w.t.forget(fakes[1].node_id)
    assert w.learn(node(honest[7]), "k7")


def test_hints_of_unknown_nodes_count_against_the_sender_too():
    w = World(Limits(per_sender=2))
    ids = [Identity.generate() for _ in range(4)]
    assert [w.t.beat(beat(i), "liar") for i in ids] == [True, True, False, False]
    entries = [wire.DigestEntry(i.node_id, 1, 0, 1, b"") for i in ids]
    assert len(w.t.entries(entries, "liar", w.m.held)) == 2  # the two already admitted


def test_an_unsigned_hint_cannot_pin_a_node_its_numbers_before_its_record_arrives():
    w, x = World(), Identity.generate()
    lie = wire.DigestEntry(x.node_id, 2 ** 62, 0, 10 ** 12, b"")  # X unknown here: only a hint
    w.m.on_digest("liar", w.t.entries([lie], "liar", w.m.held))
    assert w.m.members[x.node_id].record is None
    assert w.learn(node(x))  # X's own record: it replaces what the hint said
    m = w.m.members[x.node_id]
    assert m.record is not None and m.incarnation == 1
    b = beat(x, hb=1)
    assert w.t.beat(b, "k") and w.m.on_beat(b) is not None and w.m.members[x.node_id].heartbeat == 1


def test_copies_of_a_held_record_and_relays_of_a_node_heard_directly_are_not_checked():
    w, v = World(), Identity.generate()
    rec = node(v)
    assert w.learn(rec)
    w.m.on_beat(beat(v, hb=1))
    checked = []
    w.t.key_of = lambda node_id: checked.append(node_id) or w.m.key_of(node_id)
    assert not w.t.record(rec, "k")  # the same record again: nothing to do
    w.t.fresh = lambda node_id: True
    forged = wire.DigestEntry(v.node_id, 1, 0, 99, b"")
    assert w.t.entries([forged], "k", w.m.held) == []  # skipped: we hear v ourselves
    assert w.counts[FORGED] == 0
