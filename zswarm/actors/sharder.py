"""Sharder actor (worker mode, on a server): keeps the model split over the online workers.

It hears ``ledger_changed`` (tell), reads the alive workers from the Ledger (ask, downward),
and when the set of workers differs from the engine's, re-shards, at most once per
``settle_s``: it opens a tunnel entry per new worker (a 127.0.0.1 port carried to the worker's
RPC server through CURVE), asks the Gateway to hold the engine until nothing is in flight
(requests wait; none is dropped), then has the RPCSupervisor restart the engine, whose argv is
built from :attr:`box` at every start. A worker that dies mid-request kills or fails that
request; the engine restarts and the next plan leaves the dead worker out.

Static mode (``--rpc-servers``) uses the same path with a fixed device list and no tunnels.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pykka

from ..sharding import Device, Plan, ShortOfMemory, make_plan
from .listener import Event, ListenerMixin

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 2.0


class PlanBox:
    """The current plan, read by the engine's argv builder in the supervisor's thread.

    Only the Sharder writes it; replacing the attribute is atomic, and a Plan is immutable.
    """

    def __init__(self) -> None:
        self.plan: Plan | None = None


@dataclass
class _Reshard:
    reason: str


class _Idle:
    pass


class SharderActor(ListenerMixin, pykka.ThreadingActor):
    def __init__(self, box: PlanBox, gateway: Any, supervisor: Any, ledger: Any | None,
                 open_tunnel: Callable[[str], Any] | None, local: Device | None, needed: int,
                 settle_s: float, static: list[str] | None = None, stats: Any = None):
        super().__init__()
        self._box = box
        self._gateway = gateway
        self._supervisor = supervisor
        self._ledger = ledger
        self._open_tunnel = open_tunnel  # remote tunnel endpoint -> started TunnelEntry
        self._local = local
        self._needed = needed
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
        self._box.plan = self._plan(self._workers_now()) if self._static else self._plan([])

    # --- events ---
    def on_receive(self, message: Any) -> None:
        if isinstance(message, Event):
            self.on_event(message)
        elif isinstance(message, _Reshard):
            self._reshard(message.reason)
        elif isinstance(message, _Idle):
            self._swap()

    def on_ledger_changed(self) -> None:
        workers = self._workers_now()
        current = self._box.plan
        wanted = tuple(sorted([w.id for w in workers] + (["local"] if self._local else [])))
        if current is None or current.key() != wanted:
            self._schedule("workers changed")

    def reshard(self) -> str:
        """Re-shard now (admin), whatever changed."""
        self._reshard("asked by the operator", force=True)
        return self._error or "re-sharding"

    def engine_layers(self, line: str) -> None:
        """The engine's ``LAYERS {json}`` report: layers per device endpoint."""
        try:
            self._layers = {str(k): int(v) for k, v in json.loads(line).items()}
        except (ValueError, TypeError, AttributeError):
            log.warning("unreadable LAYERS report: %r", line[:200])

    def status(self) -> dict[str, Any]:
        plan = self._box.plan
        workers = []
        local_layers = self._layers.get("local", 0)
        if plan is not None:
            for d in plan.remote:
                workers.append({"id": d.id, "name": d.name, "endpoint": d.endpoint, "mem": d.mem,
                                "layers": self._layers.get(d.endpoint, 0)})
        return {"workers": workers, "local_layers": local_layers,
                "n_layers": sum(self._layers.values()), "reshards": self._reshards,
                "error": self._error, "pending": self._pending is not None}

    # --- the work ---
    def _workers_now(self) -> list[Device]:
        if self._static:
            return [Device(f"static:{e}", e, e, 0) for e in self._static]
        if self._ledger is None:
            return []
        out = []
        for p in self._ledger.peers().get(timeout=ASK_TIMEOUT_S):
            tunnel = p["endpoints"].get("tunnel")
            if p["role"] == "worker" and p["state"] == "alive" and tunnel and "rpc" in p["flags"]:
                out.append(Device(p["id"], p["name"], tunnel, p["mem_free"]))
        return out

    def _plan(self, workers: list[Device]) -> Plan | None:
        try:
            if self._static:  # llama.cpp splits by the memory each server reports
                n = len(workers) + (1 if self._local else 0)
                return Plan(tuple(workers) + ((self._local,) if self._local else ()), tuple([1 / n] * n))
            plan = make_plan(workers, self._local, self._needed)
            self._error = ""
            return plan
        except ShortOfMemory as e:
            if self._error != str(e):
                log.error("cannot load the model: %s", e)
            self._error = str(e)
            return None

    def _schedule(self, reason: str) -> None:
        if self._timer is not None:
            return  # one re-shard is already coming; it will read the ledger afresh
        delay = max(0.0, self._last + self._settle_s - time.monotonic())
        self._timer = threading.Timer(delay, _tell, args=(self.actor_ref, _Reshard(reason)))
        self._timer.daemon = True
        self._timer.start()

    def _reshard(self, reason: str, force: bool = False) -> None:
        self._timer = None
        workers = self._workers_now()
        plan = self._plan(workers)
        if plan is None:
            return  # keep serving with what we have; the error is in status
        current = self._box.plan
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
            self._gateway.hold_engine(lambda: _tell(self.actor_ref, _Idle()))

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
                entry = self._open_tunnel(d.endpoint)
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

    def on_stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for _, entry in self._tunnels.values():
            entry.stop()
        self._tunnels.clear()


def _tell(ref: pykka.ActorRef, msg: Any) -> None:
    try:
        ref.tell(msg)
    except pykka.ActorDeadError:
        pass
