"""Choosing the node for one request: pure logic, no socket, no thread.

The Balancer actor builds a :class:`RouteTable` from the ledger; the Gateway's socket thread
owns one :class:`Router` and asks it, inline, for every request (no thread hop on the hot path).
The Router keeps what only the gateway sees: requests in flight per node and recent failures.

Policies:
- ``p2c`` (default): power of two choices on requests in flight; near least-busy quality with
  no herding when many entry points share stale load figures;
- ``least-busy``: fewest in flight, ties at random;
- ``round-robin``; ``random``.
A node that failed ``COOLDOWN_AFTER`` times in a row, or timed out once, is skipped for
``cooldown_s`` unless no other node serves the model; so is a node the ledger suspects.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Callable

POLICIES = ("p2c", "least-busy", "round-robin", "random")
COOLDOWN_AFTER = 2  # consecutive failures; one failure may be the request's fault
COOLDOWN_S = 10.0  # long enough for a restarting engine, short enough to notice it came back


@dataclass(frozen=True)
class Route:
    node: str  # node id
    endpoint: str  # gateway endpoint ("" for this node's own engine)
    models: tuple[str, ...]
    name: str = ""
    # the ledger has not heard from the node for a moment (a busy or lossy link, or the start of
    # a partition): chosen only when no other node serves the model, and its requests go on
    suspect: bool = False
    curve: str = ""  # the node's own CURVE key (Z85), from its signed record: its gateway's server key

    @property
    def local(self) -> bool:
        return self.endpoint == ""


@dataclass(frozen=True)
class RouteTable:
    routes: tuple[Route, ...] = ()

    def models(self) -> list[str]:
        return sorted({m for r in self.routes for m in r.models})

    def serving(self, model: str) -> list[Route]:
        return [r for r in self.routes if model in r.models]


def peer_gateway(endpoint: str) -> bool:
    """Is ``endpoint`` one a peer's gateway may announce? Only tcp: a member whose record said
    ``ipc:///...`` would have this node's gateway dial a local socket of its choosing."""
    return endpoint.startswith("tcp://") and len(endpoint) <= 255  # libzmq caps a routing id at 255


class NoRoute(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class _Health:
    failures: int = 0
    until: float = 0.0


@dataclass
class Router:
    policy: str = "p2c"
    cooldown_s: float = COOLDOWN_S
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    table: RouteTable = field(default_factory=RouteTable)
    in_flight: dict[str, int] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)
    _health: dict[str, _Health] = field(default_factory=dict)
    _rr: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")

    def pick(self, model: str, exclude: set[str] = frozenset(), target: str = "") -> Route:
        """The route for one request, or :class:`NoRoute` with an OpenAI-style reason."""
        serving = self.table.serving(model)
        if not serving:
            raise NoRoute("model_not_found", f"no node serves model {model!r}")
        if target:
            chosen = [r for r in serving if r.node == target or r.name == target]
            if not chosen:
                raise NoRoute("no_node", f"target node {target!r} does not serve model {model!r}")
            return chosen[0]
        candidates = [r for r in serving if r.node not in exclude]
        if not candidates:
            raise NoRoute("no_node", f"no node left to serve model {model!r}")
        candidates = [r for r in candidates if not r.suspect] or candidates
        now = self.clock()
        healthy = [r for r in candidates if self._health.get(r.node, _Health()).until <= now]
        candidates = healthy or candidates
        if len(candidates) == 1:
            return candidates[0]
        load = lambda r: self.in_flight.get(r.node, 0)
        if self.policy == "random":
            return self.rng.choice(candidates)
        if self.policy == "round-robin":
            ordered = sorted(candidates, key=lambda r: r.node)
            return ordered[next(self._rr) % len(ordered)]
        if self.policy == "least-busy":
            low = min(map(load, candidates))
            return self.rng.choice([r for r in candidates if load(r) == low])
        a, b = self.rng.sample(candidates, 2)
        return a if load(a) < load(b) or (load(a) == load(b) and self.rng.random() < 0.5) else b

    def started(self, node: str) -> None:
        self.in_flight[node] = self.in_flight.get(node, 0) + 1

    def finished(self, node: str, ok: bool, cool: bool = False) -> None:
        """A request on ``node`` ended. ``cool``: a failure that cools the node down at once
        (it timed out: the next request would most likely wait as long)."""
        self.released(node)
        h = self._health.setdefault(node, _Health())
        if ok:
            h.failures, h.until = 0, 0.0
            self.served[node] = self.served.get(node, 0) + 1
        else:
            h.failures += 1
            if cool or h.failures >= COOLDOWN_AFTER:
                h.until = self.clock() + self.cooldown_s

    def released(self, node: str) -> None:
        """A request left ``node`` without telling anything about its health (its client cancelled)."""
        self.in_flight[node] = max(0, self.in_flight.get(node, 0) - 1)

    def forgive(self, node: str) -> None:
        """Forget ``node``'s failures: it came back (its failures were its absence)."""
        self._health.pop(node, None)

    def cooling(self) -> list[str]:
        now = self.clock()
        return sorted(n for n, h in self._health.items() if h.until > now)
