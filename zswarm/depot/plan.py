"""Which piece to ask of which peer next, and what to make of what came back. Pure: no socket,
no file, no clock of its own (the caller passes ``now``).

- Each peer has a window of pieces in flight; the lowest missing piece goes to the first peer
  with room, so a fast peer takes more and several peers fetch one file at once.
- A piece is checked against the manifest as it arrives. A wrong one is a strike against its
  peer, which is not asked for that piece again; at ``max_strikes`` the peer is dropped from
  this fetch (its pieces in flight go back to the others).
- A holder at its share rate defers a piece: the piece goes back, and that peer waits.
- A piece in flight too long goes back (the peer is slow or gone), with no strike.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .digest import Fingerprint

WINDOW = 8  # pieces in flight per peer
MAX_STRIKES = 3
PIECE_TIMEOUT_S = 15.0
TIMEOUT_PAUSE_S = 1.0

OK, CORRUPT, UNEXPECTED = "ok", "corrupt", "unexpected"


@dataclass
class _Peer:
    flying: dict[int, float] = field(default_factory=dict)  # piece -> when it was asked for
    refused: set[int] = field(default_factory=set)  # pieces it served wrong
    strikes: int = 0
    paused_until: float = 0.0
    pieces: int = 0  # good pieces it sent in this fetch


class FetchPlan:
    def __init__(self, fp: Fingerprint, done: set[int] | None = None, window: int = WINDOW,
                 max_strikes: int = MAX_STRIKES):
        self.fp = fp
        self.done: set[int] = {i for i in (done or ()) if 0 <= i < fp.count}
        self.window = window
        self.max_strikes = max_strikes
        self.peers: dict[str, _Peer] = {}
        self.dropped: set[str] = set()  # peers out of this fetch (strikes, or they said they hold nothing)

    # --- peers ---
    def add_peer(self, peer: str) -> None:
        if peer not in self.peers and peer not in self.dropped:
            self.peers[peer] = _Peer()

    def remove_peer(self, peer: str) -> None:
        self.peers.pop(peer, None)

    def drop(self, peer: str) -> None:
        """Out of this fetch for good (it lied, or holds nothing)."""
        self.peers.pop(peer, None)
        self.dropped.add(peer)

    # --- asking ---
    def _flying(self) -> set[int]:
        return {i for p in self.peers.values() for i in p.flying}

    def next(self, peer: str, now: float) -> int | None:
        """The piece to ask ``peer`` for now (marked in flight), or None."""
        p = self.peers.get(peer)
        if p is None or len(p.flying) >= self.window or now < p.paused_until:
            return None
        flying = self._flying()
        for i in range(self.fp.count):
            if i not in self.done and i not in flying and i not in p.refused:
                p.flying[i] = now
                return i
        return None

    # --- answers ---
    def arrived(self, peer: str, index: int, data: bytes) -> str:
        """OK: keep ``data`` (write it); CORRUPT: it does not match the manifest; UNEXPECTED: a
        piece we did not ask this peer for, or have already."""
        p = self.peers.get(peer)
        if p is None or index not in p.flying:
            return UNEXPECTED
        del p.flying[index]
        if index in self.done:
            return UNEXPECTED
        _, length = self.fp.piece_range(index)
        if len(data) != length or hashlib.sha256(data).digest() != self.fp.pieces[index]:
            p.refused.add(index)
            p.strikes += 1
            if p.strikes >= self.max_strikes:
                self.drop(peer)
            return CORRUPT
        self.done.add(index)
        p.pieces += 1
        return OK

    def deferred(self, peer: str, index: int, wait_s: float, now: float) -> None:
        p = self.peers.get(peer)
        if p is not None:
            p.flying.pop(index, None)
            p.paused_until = max(p.paused_until, now + min(max(wait_s, 0.0), 5.0))

    def expire(self, now: float, timeout_s: float = PIECE_TIMEOUT_S) -> list[tuple[str, int]]:
        """Pieces in flight longer than ``timeout_s``: back to the missing, their peer paused."""
        late = []
        for name, p in self.peers.items():
            for i, at in list(p.flying.items()):
                if now - at > timeout_s:
                    del p.flying[i]
                    p.paused_until = now + TIMEOUT_PAUSE_S
                    late.append((name, i))
        return late

    def forget(self, indices: set[int]) -> None:
        """These pieces are not on disk after all (a re-check found them wrong): fetch them again."""
        self.done -= indices

    # --- how far ---
    @property
    def complete(self) -> bool:
        return len(self.done) == self.fp.count

    @property
    def have_bytes(self) -> int:
        return sum(self.fp.piece_range(i)[1] for i in self.done)
