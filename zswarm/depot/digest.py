"""A model file's content name: the SHA-256 of the whole file, with the hashes of its pieces.

Computed in one pass (about 1 GB/s here) and cached by path, size and modification time in a
JSON file of the state directory, so a restart does not read the file again. Pure apart from
the file reads and the cache file; no socket, no thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

MIN_PIECE_BYTES = 1 << 20
MAX_PIECES = 1 << 16  # a manifest stays near 2 MB whatever the file's size
SHA256_HEX = 64


def piece_bytes_for(size: int) -> int:
    """The piece size for a file of ``size`` bytes: 1 MiB, doubled until it has at most MAX_PIECES."""
    piece = MIN_PIECE_BYTES
    while (size + piece - 1) // piece > MAX_PIECES:
        piece *= 2
    return piece


def is_sha256(text: str) -> bool:
    return len(text) == SHA256_HEX and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class Fingerprint:
    sha256: str  # hex
    size: int
    piece_bytes: int
    pieces: tuple[bytes, ...]  # SHA-256 of each piece

    def piece_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of piece ``index``."""
        offset = index * self.piece_bytes
        return offset, min(self.piece_bytes, self.size - offset)

    @property
    def count(self) -> int:
        return len(self.pieces)

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size, "piece_bytes": self.piece_bytes,
                "pieces": [p.hex() for p in self.pieces]}

    @classmethod
    def from_json(cls, obj: dict) -> "Fingerprint":
        fp = cls(str(obj["sha256"]), int(obj["size"]), int(obj["piece_bytes"]),
                 tuple(bytes.fromhex(p) for p in obj["pieces"]))
        if not fp.consistent():
            raise ValueError("an inconsistent fingerprint")
        return fp

    def consistent(self) -> bool:
        """Do size, piece size and the number of pieces agree (a manifest from a peer is checked)?"""
        return (is_sha256(self.sha256) and self.size > 0 and self.piece_bytes >= MIN_PIECE_BYTES
                and self.piece_bytes == piece_bytes_for(self.size)
                and len(self.pieces) == (self.size + self.piece_bytes - 1) // self.piece_bytes
                and all(len(p) == 32 for p in self.pieces))


def fingerprint(path: str) -> Fingerprint:
    """Read ``path`` once: its SHA-256 and its pieces' hashes. OSError if it cannot be read."""
    size = os.path.getsize(path)
    piece = piece_bytes_for(size)
    whole = hashlib.sha256()
    pieces = []
    with open(path, "rb") as f:
        while block := f.read(piece):
            whole.update(block)
            pieces.append(hashlib.sha256(block).digest())
    return Fingerprint(whole.hexdigest(), size, piece, tuple(pieces))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class DigestCache:
    """Fingerprints of files on this machine, kept in ``cache_path`` (JSON) by real path, size
    and modification time: a file that changed is read again."""

    def __init__(self, cache_path: str | os.PathLike):
        self._path = str(cache_path)

    def _load(self) -> dict:
        try:
            with open(self._path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, path: str) -> Fingerprint:
        """The fingerprint of ``path``, from the cache or read now (and cached). OSError if unreadable."""
        real = os.path.realpath(path)
        st = os.stat(real)
        key = f"{st.st_size}:{st.st_mtime_ns}"
        data = self._load()
        entry = data.get(real)
        if isinstance(entry, dict) and entry.get("key") == key:
            try:
                return Fingerprint.from_json(entry["fingerprint"])
            except (KeyError, TypeError, ValueError):
                pass
        fp = fingerprint(real)
        self.put(real, fp, key)
        return fp

    def put(self, path: str, fp: Fingerprint, key: str | None = None) -> None:
        real = os.path.realpath(path)
        if key is None:
            st = os.stat(real)
            key = f"{st.st_size}:{st.st_mtime_ns}"
        data = self._load()
        data[real] = {"key": key, "fingerprint": fp.to_json()}
        tmp = f"{self._path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self._path)
        except OSError as e:  # a cache: the next start reads the file again
            log.warning("cannot write the digest cache %s: %s", self._path, e)
