"""Worker mode's arithmetic: which devices hold the model, in what proportions, and whether the
cluster's memory can hold it at all. Pure logic; the Sharder actor acts on it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MIB = 1 << 20
# A GGUF's tensors are most of what a loaded model needs; the rest is compute buffers and the
# KV cache, which grow with the context. These margins are deliberately generous for small
# models: refusing with a clear message beats llama.cpp failing half-way through a load.
OVERHEAD_FACTOR = 1.2
OVERHEAD_FIXED = 64 * MIB


class ShortOfMemory(Exception):
    pass


@dataclass(frozen=True)
class Device:
    id: str  # worker node id, or "local"
    name: str
    endpoint: str  # what the engine dials: "127.0.0.1:PORT" (tunnel entry or static server); "" for local
    mem: int  # bytes offered

    @property
    def local(self) -> bool:
        return self.id == "local"


@dataclass(frozen=True)
class Plan:
    """RPC devices first, then the local CPU if it takes a share; weights sum to 1."""

    devices: tuple[Device, ...]
    weights: tuple[float, ...]

    @property
    def remote(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if not d.local)

    @property
    def has_local(self) -> bool:
        return any(d.local for d in self.devices)

    def key(self) -> tuple[str, ...]:
        """What makes two plans the same engine: the set of devices (not their exact memory)."""
        return tuple(sorted(d.id for d in self.devices))


KV_BYTES_PER_TOKEN = 32 * 1024  # generous for small models (SmolLM2-135M needs ~23 KiB in f16)


def memory_needed(model_path: str, ctx_size: int = 2048) -> int:
    """Approximate bytes to load ``model_path`` with one context of ``ctx_size`` tokens."""
    size = os.path.getsize(model_path)
    return int(size * OVERHEAD_FACTOR) + OVERHEAD_FIXED + ctx_size * KV_BYTES_PER_TOKEN


def make_plan(workers: list[Device], local: Device | None, needed: int) -> Plan:
    """Split in proportion to memory; refuse, naming the shortfall, when it cannot fit."""
    devices = sorted(workers, key=lambda d: d.id) + ([local] if local is not None else [])
    if not devices:
        raise ShortOfMemory("no device to load the model on: no worker is online and local layers are off")
    total = sum(max(0, d.mem) for d in devices)
    if total < needed:
        raise ShortOfMemory(
            f"the cluster offers {total / MIB:.0f} MiB ({len(devices)} device(s)) but the model needs about "
            f"{needed / MIB:.0f} MiB: short by {(needed - total) / MIB:.0f} MiB; add a worker or raise --mem")
    return Plan(tuple(devices), tuple(d.mem / total for d in devices))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``2GiB``, ``512MB``, ``1.5G`` or plain bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (try 2GiB or 512MiB)")
    return int(float(m.group(1)) * _UNITS[unit])
