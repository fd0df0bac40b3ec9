"""Balancer actor: turns the ledger and the local engine's state into a routing table.

Owns no socket. It hears ``ledger_changed`` and ``engine_up`` events (``tell``), asks the
Ledger for its peers (downward, with a timeout), and hands the Gateway an immutable
:class:`~zswarm.balancing.RouteTable`; the Gateway's io thread does the per-request choice.

It keeps nothing it cannot rebuild (the table comes from the Ledger and the engine's model), so
when it dies the node starts a new one (``node.py``) instead of stopping.

Which nodes take routed requests: alive nodes flagged ``federated`` that announce a model and a
gateway endpoint (suspect ones too, marked, as a last resort). This node's own engine is a route from the first time it is up, and stays one
while it restarts or re-shards: the gateway parks its requests until it is back, or sends them
to another node that serves the model.
"""

from __future__ import annotations

import logging
from typing import Any

from ..balancing import Route, RouteTable, peer_gateway
from ..prefix import MAX_BLOCKS
from .base import GuardedActor, Watch

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 2.0


class BalancerActor(GuardedActor):
    name = "balancer"

    def __init__(self, node_id: str, name: str, gateway: Any, ledger: Any | None, route_to_peers: bool,
                 watch: Watch | None = None):
        super().__init__(watch)
        self._node_id = node_id
        self._name = name
        self._gateway = gateway
        self._ledger = ledger
        self._route_to_peers = route_to_peers and ledger is not None
        self._local_models: tuple[str, ...] = ()
        self._table = RouteTable()

    def on_ledger_changed(self) -> None:
        self._rebuild()

    def on_engine_up(self, model: str) -> None:
        self._local_models = (model,)
        self._rebuild()

    def table(self) -> RouteTable:
        return self._table

    def _rebuild(self) -> None:
        routes = []
        if self._local_models:
            routes.append(Route(self._node_id, "", self._local_models, self._name))
        if self._route_to_peers:
            for p in self._ledger.peers().get(timeout=ASK_TIMEOUT_S):
                gateway = p["endpoints"].get("gateway")
                # a suspect node keeps its route, marked: it is chosen only when no other node
                # serves the model, and its requests in flight go on (a busy or lossy link makes
                # the ledger suspect a node for a moment; dropping the route would fail them all)
                if (p["state"] in ("alive", "suspect") and "federated" in p["flags"] and p["models"]
                        and gateway and peer_gateway(gateway)):
                    routes.append(Route(p["id"], gateway, tuple(p["models"]), p["name"],
                                        suspect=p["state"] == "suspect", curve=p.get("curve", ""),
                                        prefixes=_prefixes(p.get("prefixes")), decode_tps=_speed(p.get("decode_tps")),
                                        prefill_tps=_speed(p.get("prefill_tps"))))
        table = RouteTable(tuple(routes))
        if table != self._table:
            said = lambda t: [(r.name or r.node, r.models) for r in t.routes]  # noqa: E731
            if said(table) != said(self._table):  # not for each new prefix or speed a record brings
                log.info("routes: %s", ", ".join(f"{r.name or r.node}={'/'.join(r.models)}" for r in routes) or "none")
            self._table = table
            self._gateway.set_routes(table)


MAX_SLOTS_SEEN = 64  # slot chains taken from one record (a member could announce any number)


def _prefixes(value: Any) -> tuple[tuple[int, ...], ...]:
    """A record's ``prefixes``, as the router compares them: lists of ints, capped; else nothing."""
    if not isinstance(value, list):
        return ()
    return tuple(tuple(h for h in c[:MAX_BLOCKS] if isinstance(h, int)) for c in value[:MAX_SLOTS_SEEN]
                 if isinstance(c, list))


def _speed(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and 0 < value < 1e7 else 0.0
