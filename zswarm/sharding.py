"""Worker mode's arithmetic: which devices hold the model, in what proportions, whether the
cluster's memory can hold it at all, and which server holds which worker. Pure logic; the Sharder
actor acts on it, the worker's status and the Swarm page read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .engine.layers import layer_targets
from .footprint import Footprint

MIB = 1 << 20


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


def counted_memory(claimed: int, cap: int, reported: int | None) -> int:
    """What a worker's memory claim counts for in a split: at most ``cap`` (--max-worker-mem),
    and at most what its RPC server reported free (None: not reported yet). A claim decides the
    worker's share of the layers, so a liar or a typo must not take them all."""
    return max(0, min(claimed, cap, reported if reported is not None else claimed))


def make_plan(workers: list[Device], local: Device | None, fp: Footprint | None) -> Plan:
    """Split in proportion to memory (the seed's rule); when that leaves a device short, in
    proportion to what each has left after its compute buffer (and, for the host, the layers
    outside the repeating ones), which holds the most. Refuse, naming the shortfall, when no split
    fits: each device's share of the weights and KV cache plus its compute buffer must fit in the
    memory it offers (:mod:`zswarm.footprint`). ``fp`` None (the header could not be read): by
    memory, unchecked; the engine's load will say what is wrong."""
    devices = sorted(workers, key=lambda d: d.id) + ([local] if local is not None else [])
    if not devices:
        raise ShortOfMemory("no device to load the model on: no worker is online and local layers are off")
    by_memory = tuple(max(0, d.mem) for d in devices)
    if fp is None:
        if not sum(by_memory) > 0:
            raise ShortOfMemory(f"the {len(devices)} device(s) offer no memory")
        return Plan(tuple(devices), tuple(m / sum(by_memory) for m in by_memory))
    if devices == [local]:  # the engine loads it alone, as one CPU does
        if fp.single() <= local.mem:
            return Plan((local,), (1.0,))
        fixed = [fp.single() - fp.layers_bytes(0, fp.shape.n_layer)]
    else:
        fixed = [_fixed(fp, d) for d in devices]
        left = [max(0, d.mem - f) for d, f in zip(devices, fixed)]
        # by memory; else by what is left after the fixed buffers, without the devices that have
        # nothing left (a worker smaller than its compute buffer cannot take a layer)
        tries = [(devices, fixed, by_memory)]
        usable = [i for i, x in enumerate(left) if x > 0]
        tries.append(([devices[i] for i in usable], [fixed[i] for i in usable], [left[i] for i in usable]))
        for ds, fs, weights in tries:
            if ds and sum(weights) > 0 and _fits(fp, ds, fs, weights):
                return Plan(tuple(ds), tuple(w / sum(weights) for w in weights))
    total = sum(by_memory)
    needed = sum(fixed) + fp.layers_bytes(0, fp.shape.n_layer)
    short = needed - total
    why = (f"short by {short / MIB:.0f} MiB" if short > 0 else
           "no split fits (each device needs its compute buffer on top of its layers)")
    raise ShortOfMemory(
        f"the cluster offers {total / MIB:.0f} MiB ({len(devices)} device(s)) but the model needs about "
        f"{needed / MIB:.0f} MiB at context {fp.ctx} ({fp.parts()}): {why}; add a worker or raise --mem")


def _fixed(fp: Footprint, d: Device) -> int:
    """What a device needs whatever its share: its compute buffer; the host also holds the
    layers outside the repeating ones (embeddings, output head) and the output buffer."""
    if d.local:
        return fp.host_compute() + fp.host_weights + fp.output_buffer()
    return fp.device_compute()


def _fits(fp: Footprint, devices: list[Device], fixed: list[int], weights: Sequence[int]) -> bool:
    first = 0
    for d, f, count in zip(devices, fixed, layer_targets(fp.shape.n_layer, weights)):
        if f + fp.layers_bytes(first, count) > d.mem:
            return False
        first += count
    return True


# --- who holds which worker ---
# llama.cpp's RPC server serves one client connection at a time: a second server dialing a worker
# that serves a split waits until the first lets go. So a worker belongs to one server at a time.
# Each server announces its claims in its own ledger record (one writer per record: the ledger is
# last-writer-wins per node), and every node decides from the same records who holds a worker:
#
# - only claims of servers the ledger holds alive or suspect count: a server that left, or that
#   the ledger declares dead, holds nothing;
# - a held claim (past its settle wait: the server's engine uses the worker) beats a fresh one, so
#   a newcomer never takes a worker in use, whatever its clock says;
# - between two claims of the same kind the earlier ``since`` wins, then the lower server id: a
#   total order, so two servers that claimed one free worker at the same moment agree on the
#   winner as soon as each has the other's record; the loser lets go and plans without it.
#
# A server claims only workers that nobody holds in its view, and uses one only after its claim
# has stood ``settle_s`` (time for a rival's claim to reach it) without being outranked.

HOLDING_STATES = ("alive", "suspect")


@dataclass(frozen=True)
class Claim:
    """One server's claim on one worker (:class:`zswarm.wire.Claim` plus who claims)."""

    server: str
    worker: str
    since: float  # unix seconds, on the claiming server's clock
    held: bool = False

    def rank(self) -> tuple[bool, float, str]:
        """Smaller wins."""
        return (not self.held, self.since, self.server)


def holders(claims: Iterable[Claim], states: Mapping[str, str]) -> dict[str, Claim]:
    """worker id -> the winning claim, among the claims of servers whose ledger state (in
    ``states``, server id -> "alive" | "suspect" | "dead") still holds; a server missing from
    ``states`` (left, removed) holds nothing."""
    best: dict[str, Claim] = {}
    for c in claims:
        if states.get(c.server) not in HOLDING_STATES:
            continue
        b = best.get(c.worker)
        if b is None or c.rank() < b.rank():
            best[c.worker] = c
    return best


@dataclass(frozen=True)
class ClaimStep:
    """What one server should do about its claims now (:func:`claim_step`)."""

    claims: tuple[Claim, ...]  # what its record should announce
    use: tuple[str, ...]  # workers it holds and may plan with
    settling: tuple[str, ...]  # claimed, waiting for a rival's claim until ``since + settle_s``
    taken: dict[str, str] = field(default_factory=dict)  # worker -> the other server that holds it
    lost: tuple[str, ...] = ()  # workers it claimed that another server's claim outranks: let go

    def settles_at(self, settle_s: float) -> float | None:
        """When the first settling claim may be used (unix seconds); None if none settles."""
        times = [c.since + settle_s for c in self.claims if c.worker in self.settling]
        return min(times) if times else None


def claim_step(me: str, usable: Iterable[str], known: Iterable[str], claims: Iterable[Claim],
               states: Mapping[str, str], now: float, settle_s: float) -> ClaimStep:
    """Server ``me``'s claims after this look at the ledger.

    ``usable``: workers it could plan with now (alive, RPC server up); ``known``: workers whose
    claims it keeps even if unusable for a moment (alive or suspect; a worker restarting its RPC
    server stays ours); ``claims``: every server's claims, ours included; ``states``: the ledger
    state of every server (ours "alive"). A free usable worker is claimed; a claim of ours that
    wins and has stood ``settle_s`` becomes held and usable; one that another claim outranks is
    dropped.
    """
    states = {**states, me: "alive"}
    claims = list(claims)
    mine = {c.worker: c for c in claims if c.server == me}
    win = holders(claims, states)
    usable = set(usable)
    keep = usable | set(known)
    out: list[Claim] = []
    use: list[str] = []
    settling: list[str] = []
    taken: dict[str, str] = {}
    lost: list[str] = []
    for w in sorted(keep):
        h = win.get(w)
        if h is None:
            if w in usable:
                out.append(Claim(me, w, now))
                settling.append(w)
        elif h.server == me:
            if not h.held and now - h.since >= settle_s and w in usable:
                h = Claim(me, w, h.since, True)
            out.append(h)
            if h.held:
                if w in usable:
                    use.append(w)
            elif w in usable:
                settling.append(w)
        else:
            taken[w] = h.server
            if w in mine:
                lost.append(w)
    return ClaimStep(tuple(out), tuple(use), tuple(settling), taken, tuple(lost))


def claims_of_records(records: Iterable[Any]) -> list[Claim]:
    """Every claim in ledger records given as dicts (the admin ``ledger`` answer); junk is skipped,
    so an odd answer never breaks a status page."""
    out = []
    for r in records:
        if not isinstance(r, Mapping) or not isinstance(r.get("id"), str):
            continue
        for c in r.get("claims") or []:
            if (isinstance(c, Mapping) and isinstance(c.get("worker"), str)
                    and isinstance(c.get("since"), (int, float)) and not isinstance(c.get("since"), bool)):
                out.append(Claim(r["id"], c["worker"], float(c["since"]), c.get("held") is True))
    return out


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
