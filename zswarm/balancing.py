"""Choosing the node for one request: pure logic, no socket, no thread.

The Balancer actor builds a :class:`RouteTable` from the ledger; the Gateway's socket thread
owns one :class:`Router` and asks it, inline, for every request (no thread hop on the hot path).
The Router keeps what only the gateway sees: requests in flight per node and recent failures.

Policies:
- ``prefix`` (default): a request whose prompt starts like what a node's engine has cached
  (:mod:`zswarm.prefix`: the chains nodes announce, and the last request this entry point
  finished on each node) goes to that node, the longest shared prefix first, unless it has more
  than ``LOAD_SLACK`` requests in flight above the least loaded candidate; otherwise (and for a
  prompt no node has) power of two choices on the expected time to answer: (in flight + 1) x
  (prompt tokens / prefill speed + answer tokens / decode speed), each speed as the node
  measured it, so a slow machine gets proportionally less;
- ``p2c``: power of two choices on requests in flight; near least-busy quality with
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
from typing import Callable, Sequence

from .prefix import best_shared

POLICIES = ("prefix", "p2c", "least-busy", "round-robin", "random")
# A holder of the prefix takes the request while it has at most this many more in flight than the
# least loaded candidate: past that, the queue ahead costs more than prefilling the prompt elsewhere.
LOAD_SLACK = 1
# (prompt tokens, answer tokens) of a request when nothing better is known: what the expected
# time to answer weighs prefill and decode speed by
DEFAULT_WORK = (256.0, 128.0)
# Two expected times closer than this (relative) are a tie, settled at random as p2c does: each
# node's speed is an average of noisy measurements, and always preferring the node measured a few
# percent faster would herd equal machines' requests onto one of them.
SAME_WITHIN = 0.15
MIN_SHARED = 1  # blocks (prefix.BLOCK_CHARS) a prompt must share with a node's cache to follow it
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
    # what the node's engine slots have cached (prefix.chain of each slot's last prompt), and how
    # fast it generates (tokens/s; 0: not measured yet), from its record
    prefixes: tuple[tuple[int, ...], ...] = ()
    decode_tps: float = 0.0
    prefill_tps: float = 0.0

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
    policy: str = "prefix"
    cooldown_s: float = COOLDOWN_S
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    table: RouteTable = field(default_factory=RouteTable)
    in_flight: dict[str, int] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)
    _health: dict[str, _Health] = field(default_factory=dict)
    _rr: itertools.count = field(default_factory=itertools.count)
    # what this entry point learned: the chain of the last request it finished on each node, and
    # this node's own engine (its slots' chains, its speed), fresher than any record
    recent: dict[str, tuple[int, ...]] = field(default_factory=dict)
    local_prefixes: tuple[tuple[int, ...], ...] = ()
    local_decode_tps: float = 0.0
    local_prefill_tps: float = 0.0
    prefix_routed: dict[str, int] = field(default_factory=dict)  # requests sent to a node for its prefix

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")

    def pick(self, model: str, exclude: set[str] = frozenset(), target: str = "",
             chain: Sequence[int] = (), work: tuple[float, float] = DEFAULT_WORK) -> Route:
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
        if self.policy == "prefix":
            return self._by_prefix(candidates, chain, work)
        a, b = self.rng.sample(candidates, 2)
        return a if load(a) < load(b) or (load(a) == load(b) and self.rng.random() < 0.5) else b

    def cached_by(self, route: Route) -> tuple[tuple[int, ...], ...]:
        own = self.local_prefixes if route.local else route.prefixes
        last = self.recent.get(route.node)
        return own + ((last,) if last else ())

    def _by_prefix(self, candidates: list[Route], chain: Sequence[int], work: tuple[float, float]) -> Route:
        load = lambda r: self.in_flight.get(r.node, 0)
        if chain:
            scored = [(best_shared(chain, self.cached_by(r)), r) for r in candidates]
            best = max(s for s, _ in scored)
            if best >= MIN_SHARED:
                bound = min(map(load, candidates)) + LOAD_SLACK
                holders = [r for s, r in scored if s == best and load(r) <= bound]
                if holders:
                    low = min(map(load, holders))
                    chosen = self.rng.choice([r for r in holders if load(r) == low])
                    self.prefix_routed[chosen.node] = self.prefix_routed.get(chosen.node, 0) + 1
                    return chosen
        return self._by_speed(candidates, work)

    def speeds(self, route: Route) -> tuple[float, float]:
        """(prefill, decode) tokens/s of a node as it measured them; 0 where not measured yet."""
        if route.local:
            return self.local_prefill_tps, self.local_decode_tps
        return route.prefill_tps, route.decode_tps

    def _by_speed(self, candidates: list[Route], work: tuple[float, float]) -> Route:
        """Power of two choices on the expected time to answer: the requests ahead and this one,
        (in flight + 1), each taking prompt tokens / prefill speed + answer tokens / decode speed.
        A node not measured yet counts as the median of those that are, so it is tried; a speed no
        candidate has measured is left out."""
        measured = [self.speeds(r) for r in candidates]
        median = [_median([m[i] for m in measured if m[i] > 0]) for i in (0, 1)]
        prompt, answer = work

        def expected(r: Route) -> float:
            prefill, decode = (s if s > 0 else median[i] for i, s in enumerate(self.speeds(r)))
            # a speed no candidate has measured weighs nothing: all would be guessed alike
            service = (prompt / prefill if prefill else 0.0) + (answer / decode if decode else 0.0)
            return (self.in_flight.get(r.node, 0) + 1) * (service or 1.0)
        a, b = self.rng.sample(candidates, 2)
        ea, eb = expected(a), expected(b)
        if abs(ea - eb) <= SAME_WITHIN * max(ea, eb):  # within what a speed measured while serving can tell
            return a if self.rng.random() < 0.5 else b
        return a if ea < eb else b

    def remember(self, node: str, chain: tuple[int, ...]) -> None:
        """A request with prompt ``chain`` finished on ``node``: its engine holds that prefix now."""
        if chain:
            self.recent[node] = chain

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


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0
