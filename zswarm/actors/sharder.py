"""Sharder actor (worker mode, on a server): keeps the model split over the online workers.

It hears ``ledger_changed`` (tell), reads the alive workers from the Ledger (ask, downward),
and when the set of workers differs from the engine's, re-shards, at most once per
``settle_s``: it opens a tunnel entry per new worker (a 127.0.0.1 port carried to the worker's
RPC server through CURVE), asks the Gateway to hold the engine until nothing is in flight
(requests wait; none is dropped), then has the RPCSupervisor restart the engine, whose argv is
built from :attr:`box` at every start. A worker that dies mid-request kills or fails that
request; the engine restarts and the next plan leaves the dead worker out.

A worker belongs to one server at a time (llama.cpp's RPC server serves one client): the Sharder
claims the free workers in its own ledger record, uses one only once its claim has stood
``claim_settle_s`` unchallenged, skips workers another server holds (saying so in the log and in
:meth:`status`), and lets go of one whose rival claim comes first. The rules are
:func:`zswarm.sharding.claim_step`. With no free worker the model loads on the server alone, as
with no worker at all (or waits for one, with ``--no-local-layers``).

Static mode (``--rpc-servers``) uses the same path with a fixed device list, no tunnels and no claims.

A re-shard that fails (the Ledger too slow to answer, a tunnel that cannot open) is tried again
later, never dropped. When the Sharder itself dies, the node stops (``node.py``): it holds the
claims, the tunnels and the plan the running engine uses, which a new one would not know.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pykka

from .. import wire
from ..footprint import Footprint
from ..sharding import (HOLDING_STATES, Claim, ClaimStep, Device, Plan, ShortOfMemory, claim_step, counted_memory,
                        holders, make_plan)
from .base import GuardedActor, Watch
from .listener import tell, tell_later

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 2.0
# How long a fresh claim stands before its worker is used. A claim reaches the other servers as
# soon as it is made (the ledger pushes a changed record at once; milliseconds on a LAN); this
# also covers a full digest round (the ledger's sync_interval_s, 2 s), by which a server that
# just joined has every record. A rival claim that still comes later is settled by the same
# rules, at the cost of one more engine restart on the losing server.
CLAIM_SETTLE_S = 2.0
# A worker that is up but whose RPC server is still starting (no "rpc" flag yet) is waited for, this
# long at most after it appeared, before a split is made without it: workers started together
# are then split over once, instead of loading everything onto the first and re-sharding when
# the next is ready (with a real model, minutes of weights through the tunnels each time).
WORKER_START_WAIT_S = 20.0
FAILED_RETRY_S = 600.0  # a worker that could not allocate its share is tried again after this (or a restart)
CLAMP_MARGIN = 1.1  # a claim re-plans when over 110% of what the worker's RPC server reports free
ENGINE_REPORTS = ("LAYERS", "RPCMEM", "RPCFAIL")  # the engine's lines the Sharder reads (engine/proc.py)


class PlanBox:
    """The current plan, read by the engine's argv builder in the supervisor's thread.

    Only the Sharder writes it; replacing the attribute is atomic, and a Plan is immutable.
    """

    def __init__(self) -> None:
        self.plan: Plan | None = None


@dataclass
class _Reshard:
    reason: str
    force: bool = False  # even if the same workers: their memory changed (a claim clamped)


class _Idle:
    pass


class SharderActor(GuardedActor):
    name = "sharder"

    def __init__(self, box: PlanBox, gateway: Any, supervisor: Any, ledger: Any | None,
                 open_tunnel: Callable[[str], Any] | None, local: Device | None, fp: Footprint | None,
                 settle_s: float, static: list[str] | None = None, stats: Any = None, node_id: str = "",
                 claim_settle_s: float = CLAIM_SETTLE_S, watch: Watch | None = None,
                 max_worker_mem: int = 1 << 40):
        super().__init__(watch)
        # What a worker's claim counts for: at most max_worker_mem, and at most what its RPC server
        # said it has free (RPCMEM); a worker whose RPC server could not allocate its share
        # (RPCFAIL) is left out until it restarts (a new incarnation). Worker id -> (incarnation, ...).
        self._max_worker_mem = max_worker_mem
        self._reported: dict[str, tuple[int, int]] = {}  # -> (incarnation, free bytes reported)
        self._failed: dict[str, tuple[int, float]] = {}  # -> (incarnation that failed to allocate, when: monotonic)
        self._force_pending = False  # a forced re-plan is due: kept until one runs
        self._waited: tuple[str, ...] = ()  # the workers last said to be waited for (logged once)
        self._starting: dict[str, float] = {}  # worker id -> when first seen without its RPC server (monotonic)
        self._incarnations: dict[str, int] = {}
        self._me = node_id
        self._claim_settle_s = claim_settle_s
        self._mine: tuple[Claim, ...] = ()  # our claims, as our ledger record announces them
        self._taken: dict[str, str] = {}  # worker id -> the other server that holds it
        self._settling: tuple[str, ...] = ()
        self._names: dict[str, str] = {}  # node id -> name, from the last look at the ledger
        self._due = 0.0  # when the coming re-shard timer fires (monotonic)
        self._box = box
        self._gateway = gateway
        self._supervisor = supervisor
        self._ledger = ledger
        self._open_tunnel = open_tunnel  # (remote tunnel endpoint, its CURVE key) -> started TunnelEntry
        self._curves: dict[str, str] = {}  # worker id -> its own CURVE key (Z85), from its record
        self._local = local
        self._fp = fp  # what the model needs, device by device (None: unknown, split by memory alone)
        self._settle_s = settle_s
        self._static = static or []
        self._stats = stats
        self._tunnels: dict[str, tuple[str, Any]] = {}  # worker id -> (remote endpoint, entry)
        self._last = 0.0
        self._timer: threading.Timer | None = None
        self._pending: Plan | None = None
        self._error = ""
        self._layers: dict[str, int] = {}
        self._reshards = 0

    # --- setup, before the engine first starts ---
    def initial_plan(self) -> None:
        """Plan for what is known now (static servers, or local only until workers appear)."""
        self._box.plan = self._plan(self._look()[0]) if self._static else self._plan([])

    # --- events ---
    def handle(self, message: Any) -> None:
        if isinstance(message, _Reshard):
            try:
                force, self._force_pending = message.force or self._force_pending, False
                self._reshard(message.reason, force=force)
            except Exception as e:
                self._postpone(message.reason, e)
        elif isinstance(message, _Idle):
            self._swap()

    def on_ledger_changed(self) -> None:
        try:
            workers, step = self._look()
        except Exception as e:  # the re-shard looks again at whatever changed
            self._postpone("the ledger changed", e)
            return
        current = self._box.plan
        wanted = tuple(sorted([w.id for w in workers] + (["local"] if self._local else [])))
        if self._uses_taken(step):
            # our engine holds (or waits on) a worker that another server won: the winner's engine
            # waits until ours lets go, so re-plan now, not after the settle period
            self._schedule("a worker is held by another server", urgent=True)
        elif step is not None and step.settling:
            self._schedule("free workers claimed", at_least_s=self._settle_wait(step))
        elif current is None or current.key() != wanted:
            self._schedule("workers changed")

    def _postpone(self, reason: str, e: Exception) -> None:
        """Inside ``except``: a look at the ledger or a re-shard failed with ``e``; try again
        later, so that one failure never stops re-sharding for good."""
        if isinstance(e, pykka.Timeout):  # the Ledger was busy
            log.warning("re-shard (%s) postponed: the ledger did not answer in time", reason)
            self._schedule(reason, at_least_s=self._claim_settle_s)
        else:  # a tunnel that would not open, a bug: logged with its traceback, counted
            self.failed(f"re-shard ({reason})")
            self._schedule(reason, at_least_s=max(self._settle_s, self._claim_settle_s))

    def reshard(self) -> str:
        """Re-shard now (admin), whatever changed."""
        self._reshard("asked by the operator", force=True)
        return self._error or "re-sharding"

    def engine_report(self, line: str) -> None:
        """One of the engine's ENGINE_REPORTS lines (engine/proc.py)."""
        kind, _, rest = line.partition(" ")
        plan = self._box.plan
        by_endpoint = {d.endpoint: d for d in plan.remote} if plan is not None else {}
        try:
            data = json.loads(rest)
            if kind == "LAYERS":
                self._layers = {str(k): int(v) for k, v in data.items()}
            elif kind == "RPCMEM":
                self._rpc_memory({str(k): int(v[0]) for k, v in data.items()}, by_endpoint)
            elif kind == "RPCFAIL":
                self._rpc_failed([by_endpoint[e] for e in data if e in by_endpoint])
        except (ValueError, TypeError, AttributeError, IndexError, KeyError):
            log.warning("unreadable engine report: %r", line[:200])

    def _rpc_memory(self, free: dict[str, int], by_endpoint: dict[str, Device]) -> None:
        for endpoint, bytes_free in free.items():
            d = by_endpoint.get(endpoint)
            if d is None or d.id not in self._incarnations:
                continue
            self._reported[d.id] = (self._incarnations[d.id], bytes_free)
            # a margin: free memory moves a little between two loads, and each re-plan is a reload
            if d.mem > bytes_free * CLAMP_MARGIN:
                log.warning("worker %s claims %s but its RPC server has %s free: the split counts %s",
                            self._who(d.id), _size(d.mem), _size(bytes_free), _size(bytes_free))
                self._schedule("a worker has less memory than it claims", force=True)

    def _rpc_failed(self, devices: list[Device]) -> None:
        for d in devices:
            if d.id in self._incarnations and d.id not in self._failed:
                self._failed[d.id] = (self._incarnations[d.id], time.monotonic())
                log.warning("worker %s could not allocate its share of the model: the split leaves it out "
                            "until it restarts (or for %.0f minutes)", self._who(d.id), FAILED_RETRY_S / 60)
                if self._stats is not None:
                    self._stats.inc("workers_failed_to_allocate")
        if devices:
            self._schedule("a worker could not allocate its share", urgent=True)

    def _counted(self, worker_id: str, incarnation: int, claimed: int) -> int:
        """The memory a worker's claim counts for in the split (its report is this incarnation's only)."""
        reported = self._reported.get(worker_id)
        return counted_memory(claimed, self._max_worker_mem,
                              reported[1] if reported is not None and reported[0] == incarnation else None)

    def status(self) -> dict[str, Any]:
        """The plan and its layers; ``taken``: workers skipped because another server holds them;
        ``note``: one line on what that means here ("" when nothing is skipped)."""
        plan = self._box.plan
        workers = []
        local_layers = self._layers.get("local", 0)
        if plan is not None:
            for d in plan.remote:
                workers.append({"id": d.id, "name": d.name, "endpoint": d.endpoint, "mem": d.mem,
                                "layers": self._layers.get(d.endpoint, 0)})
        taken = [{"id": w, "name": self._names.get(w, ""), "by": by, "by_name": self._names.get(by, "")}
                 for w, by in sorted(self._taken.items())]
        return {"workers": workers, "local_layers": local_layers,
                "n_layers": sum(self._layers.values()), "reshards": self._reshards,
                "error": self._error, "pending": self._pending is not None,
                "taken": taken, "settling": list(self._settling), "note": self._note(plan),
                "waiting": [{"id": w, "name": self._names.get(w, "")} for w in self._waiting()],
                "left_out": [{"id": w, "name": self._names.get(w, ""), "why": "could not allocate its share"}
                             for w in sorted(self._failed)],
                "claims": [{"worker": c.worker, "since": c.since, "held": c.held} for c in self._mine]}

    # --- the work ---
    def _look(self) -> tuple[list[Device], ClaimStep | None]:
        """The workers this server may plan with now, and what it did about its claims (None:
        static mode or no cluster, where nothing is claimed)."""
        if self._static:
            return [Device(f"static:{e}", e, e, 0) for e in self._static], None
        if self._ledger is None:
            return [], None
        peers = self._ledger.peers().get(timeout=ASK_TIMEOUT_S)
        records = self._ledger.records().get(timeout=ASK_TIMEOUT_S)
        usable: dict[str, Device] = {}
        known, states = set(), {}
        for p in peers:
            states[p["id"]] = p["state"]
            if p["name"]:
                self._names[p["id"]] = p["name"]
            if p["role"] != "worker":
                continue
            if p["state"] in HOLDING_STATES:
                known.add(p["id"])
            tunnel = p["endpoints"].get("tunnel")
            self._curves[p["id"]] = p.get("curve", "")
            incarnation = p.get("incarnation", 0)
            self._incarnations[p["id"]] = incarnation
            failed = self._failed.get(p["id"])
            if failed is not None and (failed[0] != incarnation or time.monotonic() - failed[1] > FAILED_RETRY_S):
                del self._failed[p["id"]]  # restarted, or long ago: given another chance
            if p["state"] == "alive" and "rpc" not in p["flags"] and p["id"] not in self._failed:
                self._starting.setdefault(p["id"], time.monotonic())
            else:
                self._starting.pop(p["id"], None)
            if p["state"] == "alive" and tunnel and "rpc" in p["flags"] and p["id"] not in self._failed:
                usable[p["id"]] = Device(p["id"], p["name"], tunnel, self._counted(p["id"], incarnation, p["mem_free"]))
        for gone in set(self._starting) - {p["id"] for p in peers}:
            del self._starting[gone]
        for r in records:  # a claim's server is named even if the peers' snapshot (asked first) lacked it
            if r.name:
                self._names.setdefault(r.id, r.name)
        others = [Claim(r.id, c.worker, c.since, c.held) for r in records if r.id != self._me for c in r.claims]
        step = claim_step(self._me, usable, known, others + list(self._mine), states, time.time(),
                          self._claim_settle_s)
        self._take(step)
        return [usable[w] for w in step.use], step

    def _take(self, step: ClaimStep) -> None:
        """Announce our claims when they changed; say which workers another server holds."""
        for w in step.lost:
            log.warning("worker %s was claimed by server %s first: leaving it to that server and re-planning",
                        self._who(w), self._who(step.taken[w]))
        for w, by in sorted(step.taken.items()):
            if self._taken.get(w) != by and w not in step.lost:
                log.warning("worker %s is in use by server %s: this server's split leaves it out",
                            self._who(w), self._who(by))
        for w in sorted(set(self._taken) - set(step.taken)):
            log.info("worker %s is no longer held by server %s", self._who(w), self._who(self._taken[w]))
        self._taken, self._settling = dict(step.taken), step.settling
        if step.claims != self._mine:
            self._mine = step.claims
            self._ledger.update_own(claims=[wire.Claim(worker=c.worker, since=c.since, held=c.held)
                                            for c in step.claims])

    def _waiting(self) -> list[str]:
        """Workers whose RPC server is starting, still within WORKER_START_WAIT_S of their arrival."""
        now = time.monotonic()
        return sorted(w for w, t in self._starting.items() if now - t < WORKER_START_WAIT_S)

    def _who(self, node_id: str) -> str:
        name = self._names.get(node_id, "")
        return f"{name} ({node_id[:8]})" if name else node_id[:8]

    def _settle_wait(self, step: ClaimStep) -> float:
        at = step.settles_at(self._claim_settle_s)
        return 0.0 if at is None else max(0.0, at - time.time()) + 0.05

    def _uses_taken(self, step: ClaimStep | None) -> bool:
        """Does the running plan use a worker that another server holds?"""
        current = self._box.plan
        return bool(step and step.taken and current and set(step.taken) & {d.id for d in current.remote})

    def _taken_text(self) -> str:
        return ", ".join(f"{self._who(w)} is in use by server {self._who(by)}" for w, by in sorted(self._taken.items()))

    def _note(self, plan: Plan | None) -> str:
        if not self._taken:
            return ""
        if plan is not None and not plan.remote:
            return f"{self._taken_text()}: the model runs on this node alone"
        if plan is None:
            return f"{self._taken_text()}: the model waits for a free worker"
        return f"{self._taken_text()}: the split uses the other workers"

    def _plan(self, workers: list[Device]) -> Plan | None:
        try:
            if self._static:  # no memory figures for static servers: equal shares, passed as --tensor-split
                n = len(workers) + (1 if self._local else 0)
                return Plan(tuple(workers) + ((self._local,) if self._local else ()), tuple([1 / n] * n))
            plan = make_plan(workers, self._local, self._fp)
            if self._error and self._box.plan is None:
                self._gateway.engine_failed("")  # a plan at last: requests wait for the engine again
            self._error = ""
            return plan
        except ShortOfMemory as e:
            error = str(e)
            if self._taken and not workers and self._local is None:
                error = (f"no free worker: {self._taken_text()}; the model loads once a worker is free "
                         "(local layers are off)")
            elif self._taken:
                error += f" ({self._taken_text()})"
            if self._error != error:
                log.error("cannot load the model: %s", error)
                if self._box.plan is None:  # no engine runs: requests get a 503 that says why, /readyz too
                    self._gateway.engine_failed(f"cannot load the model: {error}")
            self._error = error
            return None

    def _schedule(self, reason: str, at_least_s: float = 0.0, urgent: bool = False, force: bool = False) -> None:
        """One re-shard at a time, at most one per ``settle_s`` unless ``urgent``; it reads the
        ledger afresh when it runs. A sooner request replaces a later one."""
        now = time.monotonic()
        self._force_pending = self._force_pending or force
        delay = 0.0 if urgent else max(0.0, self._last + self._settle_s - now, at_least_s)
        if self._timer is not None:
            if self._due <= now + delay + 0.01 and not force:
                return  # one re-shard is already coming, no later than this one would
            self._timer.cancel()  # if it fired meanwhile, the second re-shard finds nothing to do
        self._due = now + delay
        self._timer = tell_later(self.actor_ref, _Reshard(reason, force), delay)

    def _reshard(self, reason: str, force: bool = False) -> None:
        self._timer = None
        workers, step = self._look()
        if step is not None and step.settling:
            self._schedule("free workers claimed", at_least_s=self._settle_wait(step))
            if not force and not self._uses_taken(step):
                self._workers_coming()
                return  # plan once the claims have settled, not twice
        current = self._box.plan
        waiting = self._waiting()
        gone = current is not None and {d.id for d in current.remote} - {d.id for d in workers}
        if waiting and not force and not gone:  # a worker of ours gone cannot wait: its engine is stuck
            until = min(self._starting[w] for w in waiting) + WORKER_START_WAIT_S
            log.log(logging.INFO if tuple(waiting) != self._waited else logging.DEBUG,
                    "waiting up to %.0f s for worker(s) %s to start their RPC servers before splitting",
                    until - time.monotonic(), ", ".join(self._who(w) for w in waiting))
            self._waited = tuple(waiting)
            self._schedule("waited for starting workers", at_least_s=until - time.monotonic() + 0.05)
            self._workers_coming()
            return
        plan = self._plan(workers)
        if plan is None:
            return  # keep serving with what we have; the error is in status
        if not force and current is not None and current.key() == plan.key():
            return
        plan = self._with_tunnels(plan)
        log.info("re-sharding (%s): %s", reason,
                 ", ".join(f"{d.name}={w:.0%}" for d, w in zip(plan.devices, plan.weights)))
        self._pending = plan
        gone = current is not None and {d.id for d in current.remote} - {d.id for d in plan.remote}
        if gone:
            # a worker of the running engine is gone: the engine is dead or hung on it (llama.cpp
            # has no RPC timeouts), so waiting for its requests to finish could wait forever.
            # Restart at once; requests that had not streamed anything are retried.
            self._swap()
        else:
            self._gateway.hold_engine(lambda: tell(self.actor_ref, _Idle()))

    def _workers_coming(self) -> None:
        """The split waits for workers that are coming: with no engine yet, an earlier "cannot
        load" no longer holds, and requests wait for the engine instead of failing at once."""
        if self._box.plan is None and self._error:
            self._error = ""
            self._gateway.engine_failed("")

    def _with_tunnels(self, plan: Plan) -> Plan:
        """Give each remote worker a local tunnel port; the engine dials those."""
        if self._static or self._open_tunnel is None:
            return plan
        devices = []
        for d in plan.devices:
            if d.local:
                devices.append(d)
                continue
            have = self._tunnels.get(d.id)
            if have is None or have[0] != d.endpoint:
                if have is not None:
                    have[1].stop()
                entry = self._open_tunnel(d.endpoint, self._curves.get(d.id, ""))
                have = self._tunnels[d.id] = (d.endpoint, entry)
            devices.append(Device(d.id, d.name, f"127.0.0.1:{have[1].local_port}", d.mem))
        return Plan(tuple(devices), plan.weights)

    def _swap(self) -> None:
        """The engine is idle: switch plans and restart it (the gateway releases on READY)."""
        plan, self._pending = self._pending, None
        if plan is None:
            self._gateway.release_engine()
            return
        self._box.plan = plan
        self._layers = {}
        self._last = time.monotonic()
        self._reshards += 1
        if self._stats is not None:
            self._stats.inc("reshards")
        keep = {d.id for d in plan.remote}
        for wid in [w for w in self._tunnels if w not in keep]:
            self._tunnels.pop(wid)[1].stop()
        self._supervisor.restart_child("engine")

    def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for _, entry in self._tunnels.values():
            entry.stop()
        self._tunnels.clear()


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def holder_status(ledger: Any, worker_id: str) -> dict[str, Any] | None:
    """For a worker's ``status``: the server whose split it serves, by the same rules the servers
    follow (None: no server holds it). Asks the Ledger; runs in the caller's thread."""
    peers = ledger.peers().get(timeout=ASK_TIMEOUT_S)
    records = ledger.records().get(timeout=ASK_TIMEOUT_S)
    states = {p["id"]: p["state"] for p in peers}
    claims = [Claim(r.id, c.worker, c.since, c.held) for r in records for c in r.claims]
    h = holders(claims, states).get(worker_id)
    if h is None:
        return None
    name = next((p["name"] for p in peers if p["id"] == h.server), "")
    return {"id": h.server, "name": name, "since": h.since, "held": h.held}
