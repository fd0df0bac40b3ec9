"""A worker's tensor cache: llama.cpp's RPC server keeps each large tensor it receives in a file
named by the tensor's hash (``--cache-dir``), and a client that finds the hash there sends the
hash instead of the bytes, so a re-shard or an engine restart onto the same worker does not push
those weights through the tunnel again.

On by default in the worker's state directory (``STATE/tensor-cache``), bounded by
``--cache-max``: at each start the oldest files (by modification time) go until the folder fits.
llama.cpp 0.3.36 hashes only tensors over 10 MiB, so it saves nothing for models whose tensors are
all smaller (the embedded SmolLM2-135M: its repeating layers' largest tensor is about 1 MiB, and
the 29 MiB embedding stays on the server); for a model of a billion parameters and up, most of the
weights are in such tensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_MAX = 4 << 30
FOLDER = "tensor-cache"
_HASH_NAME = re.compile(r"[0-9a-f]{8,64}")


def prepare(path: Path, limit: int) -> int:
    """Make ``path`` and remove its oldest cached tensors (by when they were written) until at
    most ``limit`` bytes remain; return the bytes kept. OSError if the folder cannot be made or read (a start-up mistake)."""
    path.mkdir(parents=True, exist_ok=True)
    files = []
    with os.scandir(path) as it:
        for e in it:
            # only llama.cpp's files (named by a hex hash): a folder given with --cache-dir
            # may hold other things, which are never deleted
            if _HASH_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                files.append((st.st_mtime, st.st_size, e.path))
    files.sort(reverse=True)  # newest first: they stay
    kept = 0
    for _, size, name in files:
        if kept + size <= limit:
            kept += size
            continue
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
    return kept
