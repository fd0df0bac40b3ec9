"""The models directory: whole files fetched from peers, and the one partial fetch that resumes.

Layout, one folder per file content::

    MODELS/<sha256>/<name>.gguf        whole and verified: served, and announced to peers
    MODELS/<sha256>/<name>.gguf.part   being fetched (pieces written in place)
    MODELS/<sha256>/fetch.json         the partial's manifest and which pieces are on disk

Only this node's Depot writes here. A file is renamed from ``.part`` only after its SHA-256
matched, so a ``.gguf`` in this tree is always whole. No socket, no thread.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..engine.model import model_name
from .digest import Fingerprint, is_sha256

log = logging.getLogger(__name__)

SUFFIX = ".gguf"


@dataclass(frozen=True)
class Held:
    name: str
    sha256: str
    size: int
    path: str


class StoreFull(Exception):
    """A fetch would take the models directory past its cap; the message says by how much."""


class ModelsDir:
    def __init__(self, root: str | os.PathLike, max_bytes: int = 0):
        self.root = Path(root)
        self.max_bytes = max_bytes  # 0: no cap

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def whole(self) -> list[Held]:
        """The whole files here."""
        out = []
        try:
            folders = sorted(p for p in self.root.iterdir() if p.is_dir() and is_sha256(p.name))
        except OSError:
            return []
        for folder in folders:
            for f in sorted(folder.glob("*" + SUFFIX)):
                try:
                    out.append(Held(model_name(f.name), folder.name, f.stat().st_size, str(f)))
                except OSError:
                    continue
        return out

    def find(self, target: str) -> Held | None:
        """A whole file named ``target`` (a model name, or a SHA-256 in hex)."""
        for held in self.whole():
            if target in (held.sha256, held.name):
                return held
        return None

    def used(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except OSError:
                    pass
        return total

    def check_room(self, size: int, partial: int = 0) -> None:
        """StoreFull unless ``size`` more bytes (less ``partial`` already here) fit under the cap."""
        if not self.max_bytes:
            return
        need = self.used() - partial + size
        if need > self.max_bytes:
            raise StoreFull(f"the models directory {self.root} would hold {need} bytes, over its cap of "
                            f"{self.max_bytes} (--models-max)")

    # --- a partial fetch ---
    def folder(self, sha256: str) -> Path:
        return self.root / sha256

    def part_path(self, sha256: str, name: str) -> Path:
        return self.folder(sha256) / f"{name}{SUFFIX}.part"

    def final_path(self, sha256: str, name: str) -> Path:
        return self.folder(sha256) / f"{name}{SUFFIX}"

    def load_progress(self, sha256: str) -> tuple[Fingerprint | None, set[int]]:
        """The manifest and the pieces on disk of an interrupted fetch of ``sha256`` (None, {}: none)."""
        try:
            with open(self.folder(sha256) / "fetch.json") as f:
                data = json.load(f)
            fp = Fingerprint.from_json(data["manifest"])
            if fp.sha256 != sha256:
                return None, set()
            bits = bytes.fromhex(data["done"])
            done = {i for i in range(fp.count) if bits[i // 8] >> (i % 8) & 1}
            return fp, done
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None, set()

    def save_progress(self, fp: Fingerprint, done: set[int]) -> None:
        bits = bytearray((fp.count + 7) // 8)
        for i in done:
            bits[i // 8] |= 1 << (i % 8)
        path = self.folder(fp.sha256) / "fetch.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"manifest": fp.to_json(), "done": bits.hex()}, f)
        os.replace(tmp, path)

    def forget_progress(self, sha256: str) -> None:
        try:
            (self.folder(sha256) / "fetch.json").unlink()
        except OSError:
            pass
