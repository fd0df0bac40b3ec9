"""What of a zswarm checkout gets installed: its digest, and an archive of exactly those files.

Runs on the Ansible controller (with the controller's python):

    zswarm-source.py digest SRC          prints the sha256 of the files below
    zswarm-source.py pack SRC ARCHIVE    writes them to ARCHIVE (.tar.gz, under zswarm-src/)

The files are the package (``zswarm/``, without ``__pycache__`` or compiled files) and the
project files that shape the install (``pyproject.toml``, ``setup.cfg``, ``README.md``, ...):
what ``pip install SRC`` would use. The deploy role compares the digest with the one recorded
in the virtualenv and installs only when they differ, so a second run changes nothing, and a
checkout whose tests left ``__pycache__`` behind still counts as unchanged.
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from pathlib import Path

PROJECT_FILES = ("pyproject.toml", "setup.cfg", "setup.py", "README.md", "MANIFEST.in", "LICENSE", "LICENSE.txt")
PACKAGE = "zswarm"
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo")
# Archive members carry no real times (the digest decides what changed); 2020-01-01, since a
# wheel cannot hold times before 1980.
FIXED_MTIME = 1577836800


def files(src: Path) -> list[Path]:
    if not (src / PACKAGE).is_dir() or not (src / "pyproject.toml").is_file():
        raise SystemExit(f"zswarm-source: {src} is not a zswarm checkout (no {PACKAGE}/ or pyproject.toml)")
    out = [src / f for f in PROJECT_FILES if (src / f).is_file()]
    for path in sorted((src / PACKAGE).rglob("*")):
        rel = path.relative_to(src)
        if path.is_file() and not SKIP_DIRS & set(rel.parts) and not path.name.endswith(SKIP_SUFFIXES):
            out.append(path)
    return out


def digest(src: Path) -> str:
    h = hashlib.sha256()
    for path in files(src):
        h.update(str(path.relative_to(src)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def pack(src: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for path in files(src):
            data = path.read_bytes()
            info = tarfile.TarInfo(f"zswarm-src/{path.relative_to(src)}")
            info.size, info.mode, info.mtime = len(data), 0o644, FIXED_MTIME
            tar.addfile(info, io.BytesIO(data))


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "digest":
        print(digest(Path(argv[1]).resolve()))
        return 0
    if len(argv) == 3 and argv[0] == "pack":
        pack(Path(argv[1]).resolve(), Path(argv[2]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
