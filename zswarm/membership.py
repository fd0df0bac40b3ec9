"""The ledger's logic: merging records, liveness, and what to ask peers for.

Owns no socket and no thread; the Ledger actor feeds it messages and a clock, and sends what it
returns. That keeps every rule here testable with a fake clock.

Rules:
- a record replaces another for the same node when its (incarnation, version) is larger;
- a node is heard from when its own Beat arrives, or when any digest relays a heartbeat larger
  than the one we hold (so a node that lost its direct link to X does not call X dead);
- alive -> suspect after ``suspect_after_s`` without news, -> dead after ``dead_after_s``,
  removed after ``remove_after_s``; a Leave removes at once. A removed node leaves a tombstone
  so stale relays cannot resurrect it; a higher incarnation (a restart) passes the tombstone.
- a node heard *directly* (its own Beat, or its own entry in a Digest it sent) is believed
  whatever its tombstone says: only a live process can send, so that is no stale relay. This is
  what lets a partition heal at once: both sides removed each other, and without it each side
  shunned the other's beats until the tombstone expired (50 s after a 40 s partition). Relayed
  news of a buried node is still refused (its record comes back with the node's next direct beat).
- a node removed for silence (not one that left) stays dialed for ``redial_s``: neither side of a
  partition would dial the other again otherwise, and a direct beat needs a link to cross.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .wire import Beat, DigestEntry, Leave, NodeRecord, beat_statement, leave_statement, record_statement

ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"


@dataclass(frozen=True)
class Timing:
    heartbeat_interval_s: float = 0.5  # a Beat every half second: detection in seconds, ~60 B/beat
    sync_interval_s: float = 2.0  # full digest; only needed to relay, so it can be slower
    suspect_after_s: float = 2.0  # four missed beats: survives a busy 2-core host
    dead_after_s: float = 4.0  # eight missed beats; LocalAI waits 40 s
    remove_after_s: float = 30.0  # dead nodes stay listed this long so operators see them
    # relays about a removed node are refused this long: longer than any relay could carry a
    # stale record (its own beats are believed at once: see the module's docstring)
    tombstone_s: float = 60.0
    # a node removed for silence is dialed this long (a SYN about once a second, see
    # transport.link_options), so a partition up to an hour heals over direct links within about
    # a second; a longer one through the bootstrap, mDNS and remembered dials and peer exchange,
    # a few seconds more. Serf retries failed members for 24 h, every 30 s; a SYN a second for
    # an hour is the cheaper bound.
    redial_s: float = 3600.0


@dataclass
class Member:
    record: NodeRecord | None  # None until the full record arrives
    incarnation: int
    version: int
    heartbeat: int
    last_heard: float
    gossip: str = ""
    state: str = ALIVE
    # the newest heartbeat as its node signed it (wire.beat_statement): relayed in digests as is
    beat_version: int = 0
    beat_sig: bytes = b""
    direct_at: float = float("-inf")  # when its own beat last came to us (not a relay)

    def view(self, now: float) -> dict:
        rec = self.record
        return {
            "id": rec.id if rec else "",
            "name": rec.name if rec else "",
            "role": rec.role if rec else "",
            "state": self.state,
            "incarnation": self.incarnation,
            "last_seen_s": round(now - self.last_heard, 3),
            "endpoints": dict(rec.endpoints) if rec else {"gossip": self.gossip},
            "models": list(rec.models) if rec else [],
            "holdings": [{"name": h.name, "sha256": h.sha256, "size": h.size, "have": h.have}
                         for h in rec.holdings] if rec else [],
            "prefixes": [list(c) for c in rec.prefixes] if rec else [],
            "prefill_tps": rec.prefill_tps if rec else 0.0,
            "decode_tps": rec.decode_tps if rec else 0.0,
            "served": rec.served if rec else 0,
            "prefix_hits": rec.prefix_hits if rec else 0,
            "mem_total": rec.mem_total if rec else 0,
            "mem_free": rec.mem_free if rec else 0,
            "in_flight": rec.in_flight if rec else 0,
            "software": rec.software if rec else "",
            "protocol": rec.protocol if rec else 0,
            "started_at": rec.started_at if rec else 0.0,
            "flags": list(rec.flags) if rec else [],
            "curve": rec.curve if rec else "",
        }


@dataclass
class Changes:
    """What one step changed, for the actor to act on."""

    wants: dict[str, str] = field(default_factory=dict)  # node id -> id of the peer to ask
    connect: set[str] = field(default_factory=set)  # gossip endpoints to dial
    disconnect: set[str] = field(default_factory=set)
    transitions: list[tuple[str, str, str]] = field(default_factory=list)  # (id, old, new)
    updated: list[str] = field(default_factory=list)  # ids whose record changed

    def __bool__(self) -> bool:
        return bool(self.wants or self.connect or self.disconnect or self.transitions or self.updated)


@dataclass
class Tombstone:
    incarnation: int  # news of this incarnation or older is stale
    until: float  # clock time the tombstone is dropped
    member: Member | None = None  # what we knew at removal (None after a Leave); a direct beat restores it


class Membership:
    """``signer`` signs this node's own statements (identity.Identity.sign); without one (unit
    tests of the rules alone) they go unsigned. What peers say is checked before it gets here
    (trust.py)."""

    def __init__(self, own: NodeRecord, timing: Timing = Timing(), clock: Callable[[], float] = time.monotonic,
                 signer: Callable[[bytes], bytes] | None = None):
        self.own = own
        self.signer = signer
        self.heartbeat = 0
        self.timing = timing
        self.clock = clock
        self.members: dict[str, Member] = {}
        self._tombstones: dict[str, Tombstone] = {}
        self._redial: dict[str, tuple[str, float]] = {}  # node removed for silence -> (gossip endpoint, until)

    # --- our own record ---
    def _sign(self, statement: bytes) -> bytes:
        return self.signer(statement) if self.signer is not None else b""

    def sign_own(self) -> NodeRecord:
        """(Re-)sign our record: after every change, before anyone sees it."""
        self.own.sig = b""
        self.own.sig = self._sign(record_statement(self.own))
        return self.own

    def beat(self) -> Beat:
        self.heartbeat += 1
        o = self.own
        return Beat(o.id, o.incarnation, o.version, self.heartbeat, o.endpoints.get("gossip", ""),
                    self._sign(beat_statement(o.id, o.incarnation, o.version, self.heartbeat)))

    def leave(self) -> Leave:
        o = self.own
        return Leave(o.id, o.incarnation, self._sign(leave_statement(o.id, o.incarnation)))

    def update_own(self, **fields) -> NodeRecord:
        for k, v in fields.items():
            setattr(self.own, k, v)
        self.own.version += 1
        return self.sign_own()

    def digest(self) -> list[DigestEntry]:
        o = self.own
        entries = [DigestEntry(o.id, o.incarnation, o.version, self.heartbeat,
                               self._sign(beat_statement(o.id, o.incarnation, o.version, self.heartbeat)))]
        # a heartbeat is relayed only as its node signed it (an unsigned one would be refused)
        entries += [DigestEntry(i, m.incarnation, m.beat_version if m.beat_sig else m.version, m.heartbeat, m.beat_sig)
                    for i, m in self.members.items() if m.beat_sig or self.signer is None]
        return entries

    def held(self, node_id: str) -> tuple[int, int, int] | None:
        """(incarnation, version, heartbeat) we hold for ``node_id``; None: not a member."""
        m = self.members.get(node_id)
        return None if m is None else (m.incarnation, m.version, m.heartbeat)

    def held_record(self, node_id: str) -> tuple[int, int] | None:
        """(incarnation, version) of the record we hold for ``node_id``; None: no record yet."""
        m = self.members.get(node_id)
        return None if m is None or m.record is None else (m.record.incarnation, m.record.version)

    def heard_directly_within(self, node_id: str, seconds: float) -> bool:
        m = self.members.get(node_id)
        return m is not None and self.clock() - m.direct_at < seconds

    def key_of(self, node_id: str) -> bytes | None:
        m = self.members.get(node_id)
        return m.record.key if m is not None and m.record is not None and m.record.key else None

    def records(self, ids: list[str]) -> list[NodeRecord]:
        out = []
        for i in ids:
            if i == self.own.id:
                out.append(self.own)
            elif (m := self.members.get(i)) and m.record is not None:
                out.append(m.record)
        return out

    # --- what peers tell us ---
    def _buried(self, node_id: str, incarnation: int) -> bool:
        tomb = self._tombstones.get(node_id)
        return tomb is not None and incarnation <= tomb.incarnation

    def _unbury(self, node_id: str, ch: Changes) -> None:
        """A buried node spoke to us itself: bring back what we knew of it, alive."""
        tomb = self._tombstones.pop(node_id)
        old = tomb.member
        if old is None:
            return  # it had left: _note takes it as a newcomer
        self._redial.pop(node_id, None)  # its endpoint is still dialed; it is a member's again
        version = old.record.version if old.record else old.version  # a newer one is asked for
        self.members[node_id] = Member(old.record, old.incarnation, version, old.heartbeat,
                                       self.clock(), old.gossip, ALIVE)
        ch.transitions.append((node_id, "removed", ALIVE))
        ch.updated.append(node_id)

    def _adopt(self, node_id: str, gossip: str, ch: Changes) -> str:
        """A node joins (again): stop redialing where it was if it is elsewhere now. Returns the
        endpoint to reach it by (the redialed one when ``gossip`` is not known yet)."""
        lost = self._redial.pop(node_id, None)
        if lost is None:
            return gossip
        if gossip and gossip != lost[0]:
            ch.disconnect.add(lost[0])
            return gossip
        return lost[0]

    def _note(self, node_id: str, incarnation: int, version: int, heartbeat: int,
              gossip: str, source: str, direct: bool, ch: Changes, sig: bytes = b"") -> None:
        if node_id == self.own.id:
            return
        if self._buried(node_id, incarnation):
            if not direct or incarnation < self._tombstones[node_id].incarnation:
                return  # a relay may carry what peers heard before they buried it too
            self._unbury(node_id, ch)
        now = self.clock()
        m = self.members.get(node_id)
        if m is None or incarnation > m.incarnation:
            if m is not None and m.gossip and m.gossip != gossip and gossip:
                ch.disconnect.add(m.gossip)
            known = gossip or (m.gossip if m else "")
            if m is None:
                known = self._adopt(node_id, known, ch)
            m = self.members[node_id] = Member(None, incarnation, version, heartbeat, now, known,
                                               beat_version=version, beat_sig=sig)
            if known:
                ch.connect.add(known)
            ch.wants[node_id] = source
            return
        if incarnation < m.incarnation:
            return
        if direct:
            m.direct_at = now
        if direct or heartbeat > m.heartbeat:
            if heartbeat > m.heartbeat or (heartbeat == m.heartbeat and sig and not m.beat_sig):
                m.beat_version, m.beat_sig = version, sig
            m.heartbeat = max(m.heartbeat, heartbeat)
            m.last_heard = now
            self._revive(node_id, m, ch)
        if gossip and not m.gossip:
            m.gossip = gossip
            ch.connect.add(gossip)
        if version > m.version or m.record is None:
            ch.wants[node_id] = source

    def _revive(self, node_id: str, m: Member, ch: Changes) -> None:
        if m.state != ALIVE:
            ch.transitions.append((node_id, m.state, ALIVE))
            m.state = ALIVE

    def on_beat(self, beat: Beat) -> Changes:
        ch = Changes()
        self._note(beat.id, beat.incarnation, beat.version, beat.heartbeat, beat.gossip, beat.id, True, ch, beat.sig)
        return ch

    def on_digest(self, sender: str, entries: list[DigestEntry]) -> Changes:
        ch = Changes()
        for e in entries:
            self._note(e.id, e.incarnation, e.version, e.heartbeat, "", sender, e.id == sender, ch, e.sig)
        return ch

    def on_records(self, records: list[NodeRecord]) -> Changes:
        ch = Changes()
        for r in records:
            if r.id == self.own.id or self._buried(r.id, r.incarnation):
                continue
            m = self.members.get(r.id)
            if m is None:
                # still dialed where it was, if it was removed for silence; moved: see below
                m = self.members[r.id] = Member(None, r.incarnation, r.version, 0, self.clock(),
                                                self._adopt(r.id, "", ch))
            if m.record is not None and (r.incarnation, r.version) <= (m.record.incarnation, m.record.version):
                continue
            if m.record is not None and (r.incarnation, r.version) < (m.incarnation, m.version):
                continue  # older than what its own beats already told us; a newer one is on its way
            if m.record is None and self.signer is not None and m.incarnation != r.incarnation:
                # A placeholder's numbers came from hints nobody signed (a beat or digest entry of
                # a node whose key we lacked): the node's own signed record overrides them.
                m.incarnation, m.version, m.heartbeat, m.beat_sig = r.incarnation, r.version, 0, b""
            gossip = r.endpoints.get("gossip", "")
            if gossip and gossip != m.gossip:
                if m.gossip:
                    ch.disconnect.add(m.gossip)
                ch.connect.add(gossip)
                m.gossip = gossip
            if r.incarnation > m.incarnation:
                m.heartbeat = 0
            m.record, m.incarnation, m.version = r, r.incarnation, r.version
            ch.updated.append(r.id)
        return ch

    def on_leave(self, node_id: str, incarnation: int) -> Changes:
        ch = Changes()
        m = self.members.get(node_id)
        if m is not None and incarnation >= m.incarnation:
            self._remove(node_id, ch, "left")
        self._tombstones[node_id] = Tombstone(incarnation, self.clock() + self.timing.tombstone_s)
        lost = self._redial.pop(node_id, None)
        if lost is not None:
            ch.disconnect.add(lost[0])
        return ch

    def revoke(self, node_id: str) -> Changes:
        """The operator revoked ``node_id``: forget it now and stop dialing it (trust.py keeps it out)."""
        ch = Changes()
        if node_id in self.members:
            self._remove(node_id, ch, "revoked")
        lost = self._redial.pop(node_id, None)
        if lost is not None:
            ch.disconnect.add(lost[0])
        self._tombstones.pop(node_id, None)
        return ch

    def _remove(self, node_id: str, ch: Changes, why: str) -> None:
        """``why``: "left" (it said so: forget it), "revoked" (the operator said so) or "removed"
        (silent too long: maybe a partition, so keep dialing it, and keep its record for the day
        it beats to us again)."""
        m = self.members.pop(node_id)
        ch.transitions.append((node_id, m.state, why))
        now = self.clock()
        silent = why == "removed"
        if m.gossip and silent:
            self._redial[node_id] = (m.gossip, now + self.timing.redial_s)
        elif m.gossip:
            ch.disconnect.add(m.gossip)
        if m.record is None and self.signer is not None:
            return  # nothing it said was ever verified: no tombstone (its numbers may be a liar's)
        self._tombstones[node_id] = Tombstone(m.incarnation, now + self.timing.tombstone_s, m if silent else None)

    # --- time passing ---
    def sweep(self) -> Changes:
        ch = Changes()
        now = self.clock()
        t = self.timing
        for node_id, m in list(self.members.items()):
            age = now - m.last_heard
            if age >= t.remove_after_s:
                self._remove(node_id, ch, "removed")
                continue
            state = DEAD if age >= t.dead_after_s else SUSPECT if age >= t.suspect_after_s else ALIVE
            if state != m.state:
                ch.transitions.append((node_id, m.state, state))
                m.state = state
        for node_id, tomb in list(self._tombstones.items()):
            if tomb.until <= now:
                del self._tombstones[node_id]
        for node_id, (endpoint, until) in list(self._redial.items()):
            if until <= now:
                del self._redial[node_id]
                if not any(m.gossip == endpoint for m in self.members.values()):
                    ch.disconnect.add(endpoint)
        return ch

    def departed(self) -> list[NodeRecord]:
        """Records of nodes removed for silence (kept with their tombstones): an operator may
        revoke a machine that is off, and a rotation seals the new token to it in case it returns."""
        return [t.member.record for t in self._tombstones.values()
                if t.member is not None and t.member.record is not None]

    def redialing(self) -> dict[str, str]:
        """Nodes removed for silence that are still dialed: id -> gossip endpoint."""
        return {i: e for i, (e, _) in self._redial.items()}

    def peers(self) -> list[dict]:
        now = self.clock()
        return [m.view(now) | {"id": i} for i, m in sorted(self.members.items())]
