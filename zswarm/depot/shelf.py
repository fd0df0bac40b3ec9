"""The holder's side of a fetch: manifest and piece queries answered from whole files.

Runs in the gateway's io thread (the queries arrive on its peers ROUTER, from members only), so
nothing here may block for long: a piece is one ``pread`` of at most a few MiB, from the page
cache most of the time. Pieces leave at no more than ``rate`` bytes per second over all
fetchers (virtual scheduling: each piece books its share of the link, and a query that would
book past a short burst is told to ask again later), so a node that shares a model keeps
serving inference. Only files whose fingerprint this node computed itself are served.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from .. import wire
from .digest import Fingerprint

BURST_S = 0.2  # how far ahead of the rate a holder may book pieces (a fetcher's window fits in it)


class Shelf:
    def __init__(self, rate: int = 0, count: Callable[[str, int], None] = lambda name, n=1: None,
                 clock: Callable[[], float] = time.monotonic, corrupt: frozenset[int] | None = frozenset(),
                 lie_in_manifest: bool = False):
        self.rate = rate  # bytes per second over all fetchers; 0: no limit
        self._count = count
        self._clock = clock
        self._files: dict[str, tuple[str, Fingerprint]] = {}
        self._booked = 0.0  # the clock time the pieces served so far have used the link until
        # pieces served wrong on purpose (a test's lying holder, ZSWARM_TEST_CORRUPT_PIECES); None: all
        self._corrupt = corrupt
        self._lie_in_manifest = lie_in_manifest  # ... and a manifest that matches them (the digest does not)

    def offer(self, files: dict[str, tuple[str, Fingerprint]]) -> None:
        """Serve these files (sha256 -> (path, fingerprint)) from now on. Any thread: one swap."""
        self._files = dict(files)

    def answer(self, node_id: str, body: wire.ManifestQuery | wire.PieceQuery) -> wire.Inference:
        held = self._files.get(body.sha256)
        if held is None:
            return wire.Fail(id=body.id, code="model_not_found", node=node_id,
                             message=f"this node does not hold {body.sha256[:12]}")
        path, fp = held
        if isinstance(body, wire.ManifestQuery):
            pieces = list(fp.pieces)
            if self._lie_in_manifest:
                import hashlib

                for i in range(fp.count) if self._corrupt is None else sorted(self._corrupt):
                    pieces[i] = hashlib.sha256(_spoil(_read(path, *fp.piece_range(i)))).digest()
            return wire.Manifest(id=body.id, sha256=fp.sha256, size=fp.size, piece_bytes=fp.piece_bytes,
                                 pieces=pieces)
        if not 0 <= body.index < fp.count:
            return wire.Fail(id=body.id, code="bad_request", node=node_id, message="no such piece")
        offset, length = fp.piece_range(body.index)
        if self.rate:
            now = self._clock()
            start = max(now, self._booked)
            if start - now > BURST_S:
                self._count("depot_pieces_deferred", 1)
                return wire.Piece(id=body.id, sha256=body.sha256, index=body.index, wait_s=start - now - BURST_S)
            self._booked = start + length / self.rate
        try:
            data = _read(path, offset, length)
        except OSError as e:
            return wire.Fail(id=body.id, code="internal", node=node_id, message=f"cannot read the file: {e.strerror}")
        if self._corrupt is None or body.index in self._corrupt:
            data = _spoil(data)
        self._count("depot_pieces_served", 1)
        self._count("depot_bytes_served", len(data))
        return wire.Piece(id=body.id, sha256=body.sha256, index=body.index, data=data)


def _read(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _spoil(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]
