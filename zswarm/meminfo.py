"""This machine's physical memory as the kernel counts it (``/proc/meminfo``): what a node
announces in its ledger record and plans local layers with, and what a worker's RPC server
offers. The one place that reads the file.

Standard library only, and nothing here may import the rest of zswarm: the RPC server child
imports it and must stay small (it never loads pykka, zmq or llama_cpp).
"""

from __future__ import annotations

MEMINFO = "/proc/meminfo"


def memory_bytes(path: str = MEMINFO) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes; 0 for a figure the file does not give, or where there
    is no such file (not Linux)."""
    total = avail = 0
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "MemTotal":
                    total = int(value.split()[0]) * 1024
                elif key == "MemAvailable":
                    avail = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total, avail
