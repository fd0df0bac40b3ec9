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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .wire import Beat, DigestEntry, NodeRecord

ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"


@dataclass(frozen=True)
class Timing:
    heartbeat_interval_s: float = 0.5  # a Beat every half second: detection in seconds, ~60 B/beat
    sync_interval_s: float = 2.0  # full digest; only needed to relay, so it can be slower
    suspect_after_s: float = 2.0  # four missed beats: survives a busy 2-core host
    dead_after_s: float = 4.0  # eight missed beats; LocalAI waits 40 s
    remove_after_s: float = 30.0  # dead nodes stay listed this long so operators see them
    tombstone_s: float = 60.0  # longer than any relay could carry a stale record


@dataclass
class Member:
    record: NodeRecord | None  # None until the full record arrives
    incarnation: int
    version: int
    heartbeat: int
    last_heard: float
    gossip: str = ""
    state: str = ALIVE

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
            "mem_total": rec.mem_total if rec else 0,
            "mem_free": rec.mem_free if rec else 0,
            "in_flight": rec.in_flight if rec else 0,
            "software": rec.software if rec else "",
            "protocol": rec.protocol if rec else 0,
            "started_at": rec.started_at if rec else 0.0,
            "flags": list(rec.flags) if rec else [],
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


class Membership:
    def __init__(self, own: NodeRecord, timing: Timing = Timing(), clock: Callable[[], float] = time.monotonic):
        self.own = own
        self.heartbeat = 0
        self.timing = timing
        self.clock = clock
        self.members: dict[str, Member] = {}
        self._tombstones: dict[str, tuple[int, float]] = {}  # id -> (incarnation, until)

    # --- our own record ---
    def beat(self) -> Beat:
        self.heartbeat += 1
        return Beat(self.own.id, self.own.incarnation, self.own.version, self.heartbeat,
                    self.own.endpoints.get("gossip", ""))

    def update_own(self, **fields) -> NodeRecord:
        for k, v in fields.items():
            setattr(self.own, k, v)
        self.own.version += 1
        return self.own

    def digest(self) -> list[DigestEntry]:
        entries = [DigestEntry(self.own.id, self.own.incarnation, self.own.version, self.heartbeat)]
        entries += [DigestEntry(i, m.incarnation, m.version, m.heartbeat) for i, m in self.members.items()]
        return entries

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
        return tomb is not None and incarnation <= tomb[0]

    def _note(self, node_id: str, incarnation: int, version: int, heartbeat: int,
              gossip: str, source: str, direct: bool, ch: Changes) -> None:
        if node_id == self.own.id or self._buried(node_id, incarnation):
            return
        now = self.clock()
        m = self.members.get(node_id)
        if m is None or incarnation > m.incarnation:
            if m is not None and m.gossip and m.gossip != gossip and gossip:
                ch.disconnect.add(m.gossip)
            m = self.members[node_id] = Member(None, incarnation, version, heartbeat, now, gossip or (m.gossip if m else ""))
            if gossip:
                ch.connect.add(gossip)
            ch.wants[node_id] = source
            return
        if incarnation < m.incarnation:
            return
        if direct or heartbeat > m.heartbeat:
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
        self._note(beat.id, beat.incarnation, beat.version, beat.heartbeat, beat.gossip, beat.id, True, ch)
        return ch

    def on_digest(self, sender: str, entries: list[DigestEntry]) -> Changes:
        ch = Changes()
        for e in entries:
            self._note(e.id, e.incarnation, e.version, e.heartbeat, "", sender, e.id == sender, ch)
        return ch

    def on_records(self, records: list[NodeRecord]) -> Changes:
        ch = Changes()
        for r in records:
            if r.id == self.own.id or self._buried(r.id, r.incarnation):
                continue
            m = self.members.get(r.id)
            if m is None:
                m = self.members[r.id] = Member(None, r.incarnation, r.version, 0, self.clock())
            if m.record is not None and (r.incarnation, r.version) <= (m.record.incarnation, m.record.version):
                continue
            if (r.incarnation, r.version) < (m.incarnation, m.version):
                continue  # older than what beats already told us; a newer one is on its way
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
        self._tombstones[node_id] = (incarnation, self.clock() + self.timing.tombstone_s)
        return ch

    def _remove(self, node_id: str, ch: Changes, why: str) -> None:
        m = self.members.pop(node_id)
        ch.transitions.append((node_id, m.state, why))
        if m.gossip:
            ch.disconnect.add(m.gossip)
        self._tombstones[node_id] = (m.incarnation, self.clock() + self.timing.tombstone_s)

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
        for node_id, (_, until) in list(self._tombstones.items()):
            if until <= now:
                del self._tombstones[node_id]
        return ch

    def peers(self) -> list[dict]:
        now = self.clock()
        return [m.view(now) | {"id": i} for i, m in sorted(self.members.items())]
