"""What the ledger believes of what members tell it: signatures, and caps on what one sender adds.

Pure: no socket, no thread, no clock. The Ledger actor asks :class:`Trust` about every record,
beat, digest entry and leave before :mod:`zswarm.membership` sees it.

- **Every statement about node X is X's own.** X's id is derived from its Ed25519 key
  (identity.py); a record must carry that key and X's signature over itself, a beat or a relayed
  heartbeat (digest entry) X's signature of that heartbeat, a leave X's signature of it. So no
  member can remove, replace, revive or impersonate another: a Leave for someone else, a record
  for another id (at any incarnation), beats in another's name are dropped and counted
  (``gossip_forged``). A record for an id we know can change only by the same key, since the id
  is the key's.
- **What one sender adds is capped.** A member holding the token can make as many identities as
  it likes, each validly signed. Each sender (the CURVE key its connection presented, which the
  ZAP handler hands up as ``User-Id``) may introduce at most ``per_sender`` nodes that have not
  been heard from directly yet; the cluster holds at most ``max_nodes``. A node heard directly
  (its own signed beat over a connection with its own key) no longer counts against whoever
  introduced it. Refusals are counted (``members_capped``).

- **A revoked node is out for good.** Its id (the operator's statement, rotation.py) passes
  nothing here again, whoever relays it (``gossip_revoked``).

Relays (digests, records passed on) stay verifiable because each statement is signed by its
subject, not by whoever passes it on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import wire
from .identity import PUBLIC_BYTES, node_id_of, verify

MAX_NODES = 256  # nodes a cluster holds (ZSWARM_MAX_NODES); each is a dialled link and a routing entry
PER_SENDER = 64  # nodes one sender may introduce before they are heard directly (ZSWARM_MAX_INTRODUCED)

FORGED, CAPPED, REVOKED = "gossip_forged", "members_capped", "gossip_revoked"


@dataclass(frozen=True)
class Limits:
    max_nodes: int = MAX_NODES
    per_sender: int = PER_SENDER


def record_ok(rec: wire.NodeRecord) -> bool:
    """Is ``rec`` signed by the node it is about, with the key its id is derived from?"""
    return (len(rec.key) == PUBLIC_BYTES and node_id_of(rec.key) == rec.id
            and verify(rec.key, rec.sig, wire.record_statement(rec)))


def beat_ok(key: bytes, node_id: str, incarnation: int, version: int, heartbeat: int, sig: bytes) -> bool:
    return verify(key, sig, wire.beat_statement(node_id, incarnation, version, heartbeat))


def leave_ok(key: bytes, leave: wire.Leave) -> bool:
    return verify(key, leave.sig, wire.leave_statement(leave.id, leave.incarnation))


@dataclass
class Trust:
    """``key_of(id)`` is the key of a node whose record we hold (None: not known yet);
    ``count(name)`` counts a refusal. ``own_id`` is never introduced."""

    own_id: str
    key_of: Callable[[str], bytes | None]
    count: Callable[[str], None]
    limits: Limits = Limits()
    # (incarnation, version) of the record held for an id; a record no newer is not checked again
    record_held: Callable[[str], tuple[int, int] | None] = lambda node_id: None
    # was the node's own beat heard this recently (seconds)? then a relay of its heartbeat tells
    # nothing and is skipped unchecked: at start-up nearly every relayed entry is new, and
    # checking them all (150 us each here) kept a 32-node cluster's ledgers from catching up
    fresh: Callable[[str], bool] = lambda node_id: False
    # sender key -> ids it introduced that have not been heard directly yet
    introduced: dict[str, set[str]] = field(default_factory=dict)
    known: set[str] = field(default_factory=set)  # ids admitted (a member, or a placeholder awaiting its record)
    revoked: set[str] = field(default_factory=set)  # ids the operator revoked (rotation.py): nothing of theirs passes

    def _revoked(self, node_id: str) -> bool:
        if node_id in self.revoked:
            self.count(REVOKED)
            return True
        return False

    # --- admission ---
    def admit(self, node_id: str, sender: str) -> bool:
        """May ``sender`` make us learn of ``node_id``? Known ids always pass."""
        if node_id == self.own_id or node_id in self.known:
            return True
        if self._revoked(node_id):
            return False
        intro = self.introduced.setdefault(sender, set())
        if len(self.known) >= self.limits.max_nodes or len(intro) >= self.limits.per_sender:
            self.count(CAPPED)
            return False
        intro.add(node_id)
        self.known.add(node_id)
        return True

    def heard_directly(self, node_id: str) -> None:
        """``node_id``'s own signed beat came over a connection with its own key."""
        for intro in self.introduced.values():
            intro.discard(node_id)

    def forget(self, node_id: str) -> None:
        """The ledger dropped ``node_id`` (it left, or was removed): its place is free."""
        self.known.discard(node_id)
        self.heard_directly(node_id)

    # --- statements ---
    def record(self, rec: wire.NodeRecord, sender: str) -> bool:
        if rec.id == self.own_id or self._revoked(rec.id):
            return False
        held = self.record_held(rec.id)
        if held is not None and (rec.incarnation, rec.version) <= held:
            return False  # a copy of what we hold (or older): changes nothing, costs no check
        if not record_ok(rec):
            self.count(FORGED)
            return False
        return self.admit(rec.id, sender)

    def beat(self, beat: wire.Beat, sender: str) -> bool:
        """A beat of a node whose record we hold must be its own; one of a node we do not know
        yet is only a hint (its record is asked for, and must verify), within the sender's cap."""
        if self._revoked(beat.id):
            return False
        key = self.key_of(beat.id)
        if key is None:
            return self.admit(beat.id, sender)
        if not beat_ok(key, beat.id, beat.incarnation, beat.version, beat.heartbeat, beat.sig):
            self.count(FORGED)
            return False
        return True

    def entries(self, entries: list[wire.DigestEntry], sender: str,
                held: Callable[[str], tuple[int, int, int] | None]) -> list[wire.DigestEntry]:
        """The digest entries worth believing. One that tells nothing new (same incarnation, no
        newer version or heartbeat than ``held(id)``'s) changes nothing, so it is not checked:
        that keeps a relayed digest cheap. Anything newer must be signed by its node. Entries of
        unknown nodes are hints, within the sender's cap."""
        out = []
        for e in entries:
            if e.id == self.own_id or self._revoked(e.id):
                continue
            key = self.key_of(e.id)
            if key is None:
                if self.admit(e.id, sender):
                    out.append(e)
                continue
            have = held(e.id)
            if have is not None and e.incarnation == have[0] and e.version <= have[1] and e.heartbeat <= have[2]:
                out.append(e)
                continue
            if have is not None and e.incarnation == have[0] and e.version <= have[1] and self.fresh(e.id):
                continue  # a newer heartbeat of a node we hear ourselves: nothing we need
            if beat_ok(key, e.id, e.incarnation, e.version, e.heartbeat, e.sig):
                out.append(e)
            else:
                self.count(FORGED)
        return out

    def leave(self, leave: wire.Leave) -> bool:
        if leave.id in self.revoked:
            return False  # gone already
        key = self.key_of(leave.id)
        if key is None or not leave_ok(key, leave):
            self.count(FORGED)
            return False
        return True
