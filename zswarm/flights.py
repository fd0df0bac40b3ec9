"""The gateway's request table: every request in flight, where it is, and what happens to it next.

Pure: no socket, no thread, no clock of its own. The Gateway actor's io thread owns one
:class:`Table` and feeds it events (a request, a reply, a lost link, the engine's state, a tick);
the table acts through the two callables it was given:

- ``send(route, body) -> bool`` hands a message to a node (the local engine, or a peer gateway);
  False when it cannot be taken right now (no connection, queue full);
- ``reply(origin, body, raw)`` answers the client that asked; ``raw`` is the encoded message
  when the table passes a node's reply through unchanged (the hot path never re-encodes).

What the table promises:

- **Every request ends**, exactly once: a Done, or a Fail that says why; or silently when its
  own client cancels it. An exception while dispatching fails that request at once (``internal``).
- **A request is retried while its client has received nothing of it**: before the first
  streamed chunk; for an answer the client gets whole (``GenRequest.whole``), until its Done,
  because the table holds its chunks. At most ``max_attempts`` sends.
- **The local engine is waited for** while it (re)starts, planned or not: the request is parked,
  not failed, up to ``park_s`` and its deadline. An engine that will not come back
  (``engine_failed``) fails parked requests at once with its reason.
- **Deadlines**: each request has one (``GenRequest.timeout_s``, set by the HTTP side); every hop
  re-bases it on its own clock, so clocks of different machines never meet. When it passes, the
  node working on it is cancelled and cooled down, and the client gets ``timeout`` (HTTP 504).
- **No route right now is not "no such model"**: a model served within the last ``recent_s`` is
  answered ``no_node`` (HTTP 503 with Retry-After, which OpenAI clients retry), not
  ``model_not_found`` (404, which they do not).
- A request routed here by a peer is served by the local engine only (no second hop).

It must never block, sleep, or touch a socket: the io thread runs it inline for every message.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import msgspec

from . import wire
from .balancing import DEFAULT_WORK, NoRoute, Route, Router, RouteTable
from .prefix import request_chain

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # sends per request before giving up (a request that kills every engine stops here)
PARK_S = 120.0  # longest wait for this node's engine to (re)load
RECENT_S = 600.0  # a model served this recently is "briefly unroutable", not "unknown"
RETRYABLE = frozenset({"engine_down", "overloaded", "no_node"})
REQUEST_FAULTS = frozenset({"bad_request", "context_length", "model_not_found", "cancelled"})
NO_DEADLINE = float("inf")
# prompts announced as cached, per slot: the engine's prompt cache keeps recent states (by bytes,
# least recently used out), so the last few prompts a slot served are very likely still there
CHAINS_PER_SLOT = 8
SPEED_WEIGHT = 0.3  # of each new measurement in the engine's speed (an exponential moving average)

Origin = tuple[str, bytes]  # ("local" | "peer", routing id of the asker)
Send = Callable[[Route, wire.Inference], bool]
Reply = Callable[[Origin, wire.Inference, Optional[bytes]], None]


@dataclass
class Flight:
    req: wire.GenRequest
    origin: Origin
    deadline: float  # on the table's clock; NO_DEADLINE when the request has none
    route: Route | None = None
    started: bool = False  # has any of the answer reached the client?
    tried: set[str] = field(default_factory=set)
    attempts: int = 0
    parked_since: float | None = None  # when it began waiting for a route (kept across re-parks)
    held: list[str] = field(default_factory=list)  # a whole answer's chunks, until its Done
    chain: tuple[int, ...] = ()  # the prompt's prefix.chain: what prefix-affinity routing compares

    @property
    def local_origin(self) -> bool:
        return self.origin[0] == "local"

    @property
    def whole(self) -> bool:
        """Chunks are held here until Done: the client sees nothing until the answer is complete."""
        return self.req.whole and self.local_origin


class Table:
    def __init__(self, node_id: str, router: Router, send: Send, reply: Reply, *,
                 count: Callable[[str], None] = lambda name: None, target_node: str = "",
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 max_attempts: int = MAX_ATTEMPTS, park_s: float = PARK_S, recent_s: float = RECENT_S,
                 linked: Callable[[str], bool] = lambda endpoint: False, slots: int = 1):
        self.node_id = node_id
        # this node's engine, as its answers show: each slot's last prompt (the engine's prefix
        # cache) and its speed; the gateway puts them in the node's record when they change
        self.local_chains: collections.deque[tuple[int, ...]] = collections.deque(
            maxlen=CHAINS_PER_SLOT * max(1, slots))
        self.prefill_tps = self.decode_tps = 0.0
        self.served_local = self.prefix_hits_local = 0  # the engine's answers, and those with a cached prefix
        self.local_changed = False
        self._linked = linked  # is the connection to this peer gateway up right now?
        self.router = router
        self._send = send
        self._reply = reply
        self._count = count
        self._target = target_node
        self._clock = clock
        self._wall = wall
        self.max_attempts = max_attempts
        self.park_s = park_s
        self.recent_s = recent_s
        self.flights: dict[str, Flight] = {}
        self.parked: dict[str, Flight] = {}  # request id -> flight waiting for a route, oldest first
        self.engine_connected = False
        self.held = False  # a re-shard drains the engine: new local requests wait
        self.problem = ""  # why the local engine will not serve at all; "" if none
        self._on_idle: Callable[[], None] | None = None
        self._seen: dict[str, float] = {}  # model -> last time a route served it
        self._seen_local: dict[str, float] = {}  # the same, for this node's own engine

    # --- what the node serves ---
    @property
    def engine_ready(self) -> bool:
        return self.engine_connected and not self.held

    def _serving(self) -> list[Route]:
        """Routes that can serve: this node's own only while its engine may come back (the ledger
        may still list a model whose engine has failed for good)."""
        return [r for r in self.router.table.routes if not (r.local and self.problem)]

    def models(self) -> list[str]:
        return sorted({m for r in self._serving() for m in r.models})

    def local_models(self) -> list[str]:
        return sorted({m for r in self._serving() if r.local for m in r.models})

    def recent_models(self) -> list[str]:
        """Models served within ``recent_s`` that no route serves now."""
        now, serving = self._clock(), set(self.models())
        return sorted(m for m, t in self._seen.items() if now - t <= self.recent_s and m not in serving)

    # --- events from clients ---
    def request(self, req: wire.GenRequest, origin: Origin) -> None:
        if req.id in self.flights or req.hops > 1:
            self._reply(origin, wire.Fail(id=req.id, code="bad_request", node=self.node_id,
                                          message="duplicate request id or routing loop"), None)
            return
        f = Flight(req, origin, self._deadline_of(req), chain=request_chain(req))
        self.flights[req.id] = f
        self._count("requests_in")
        self._dispatch(f)

    def cancel(self, rid: str, origin: Origin) -> None:
        f = self.flights.get(rid)
        if f is None or f.origin != origin:
            return  # only the request's own client may cancel it
        del self.flights[rid]
        self._count("requests_cancelled")
        self._unpark_one(f)
        if f.route is not None:
            self._send_quietly(f.route, wire.Cancel(rid))
            self.router.released(f.route.node)  # says nothing about the node's health
            self._left(f.route)

    # --- events from nodes ---
    def on_reply(self, source: str, body: wire.Inference, raw: bytes) -> None:
        """A reply from the local engine (``source`` "") or from the peer gateway at ``source``."""
        rid = getattr(body, "id", None)
        f = self.flights.get(rid) if isinstance(rid, str) else None
        if f is None or f.route is None or f.route.endpoint != source:
            self._count("late_replies")  # cancelled, timed out, or moved to another node
            return
        route = f.route
        match body:
            case wire.Chunk(text=text):
                if f.whole:
                    f.held.append(text)
                    return
                if not f.started:
                    f.started = True
                    self._count("first_chunks")
                self._reply(f.origin, body, raw)
            case wire.Done():
                self.router.finished(route.node, ok=True)
                self.router.remember(route.node, f.chain)
                if route.local:
                    self._learn(f.chain, body)
                del self.flights[f.req.id]
                self._count("requests_done")
                if f.held:
                    self._reply(f.origin, wire.Chunk(f.req.id, "".join(f.held)), None)
                self._reply(f.origin, body, raw)
                self._left(route)
            case wire.Fail(code=code):
                # the request's own fault says nothing against the node; a timeout cools it at once
                self.router.finished(route.node, ok=code in REQUEST_FAULTS, cool=code == "timeout")
                if code in RETRYABLE and self._may_retry(f):
                    self._count("requests_retried")
                    if route.local and code == "engine_down":
                        f.tried.discard(route.node)  # it comes back fresh: it may take the retry
                    self._retry(f)
                else:
                    del self.flights[f.req.id]
                    self._count("requests_failed")
                    self._reply(f.origin, body, raw)
                self._left(route)
            case _:
                self._count("gateway_bad_frames")

    def set_routes(self, table: RouteTable) -> None:
        now = self._clock()
        for r in table.routes:
            for m in r.models:
                self._seen[m] = now
                if r.local:
                    self._seen_local[m] = now
        before = {r.node for r in self.router.table.routes}
        self.router.table = table
        live = {r.node for r in table.routes}
        for node in live - before:  # back after a partition or a restart: judge it afresh
            self.router.forgive(node)
        for f in list(self.flights.values()):
            route = f.route
            if route is None or route.node in live:
                continue
            if f.started and not route.local and self._linked(route.endpoint):
                # a stream in progress on a node the ledger merely suspects (a lossy link stalls a
                # few seconds): its connection is up, so let it finish; if the node is really
                # gone, the link's heartbeat drops within seconds and link_lost ends it
                self._count("kept_on_unlisted_node")
                continue
            self.lost(f, f"node {route.name or route.node} left the cluster")
        self._unpark()  # a route may have come (back)

    def link_lost(self, endpoint: str, why: str) -> None:
        """The connection to the peer gateway at ``endpoint`` dropped: its replies are lost for good."""
        for f in list(self.flights.values()):
            if f.route is not None and f.route.endpoint == endpoint:
                self.lost(f, why.format(node=f.route.name or f.route.node))

    # --- the local engine ---
    def engine_up(self) -> None:
        self.engine_connected, self.held, self._on_idle, self.problem = True, False, None, ""
        self._unpark()

    def engine_down(self, why: str) -> None:
        self.engine_connected = False
        for f in list(self.flights.values()):
            if f.route is not None and f.route.local:
                f.tried.discard(f.route.node)  # the engine comes back fresh: it may take the retry
                self.lost(f, why)

    def engine_failed(self, problem: str) -> None:
        """The local engine will not come back by itself; ``""``: it is being tried again."""
        self.problem = problem
        if problem:
            self.held, self._on_idle = False, None  # nothing left to drain for
            self.engine_down(problem)
            self._unpark(force=True)

    def hold(self, on_idle: Callable[[], None]) -> None:
        """Give the engine no new requests (they park); call ``on_idle()`` once it has none."""
        self.held, self._on_idle = True, on_idle
        self._check_idle()

    def release(self) -> None:
        self.held, self._on_idle = False, None
        self._unpark()

    # --- time ---
    def tick(self) -> None:
        now = self._clock()
        for f in [f for f in self.parked.values() if now - f.parked_since > self.park_s and now < f.deadline]:
            self._unpark_one(f)
            self._fail(f, "engine_down", f"the model did not come back within {self.park_s:.0f} s")
        for f in [f for f in self.flights.values() if now >= f.deadline]:
            self._unpark_one(f)
            route = f.route
            if route is not None:
                self._send_quietly(route, wire.Cancel(f.req.id))
                self.router.finished(route.node, ok=False, cool=True)  # a slow node waits its turn
            self._fail(f, "timeout", f"no answer within the request's timeout of {f.req.timeout_s:.3g} s"
                       if f.req.timeout_s else "the request's deadline passed")
            if route is not None:
                self._left(route)

    def lost(self, f: Flight, why: str) -> None:
        """The node serving ``f`` is gone: retry if the client has nothing yet, else fail cleanly."""
        route = f.route
        if route is not None:
            self.router.finished(route.node, ok=False)
        f.route = None
        if self._may_retry(f):
            self._count("requests_retried")
            self._retry(f)
        else:
            self._fail(f, "engine_down", f"{why}; the answer was cut short" if f.started else why)
        if route is not None:
            self._left(route)

    # --- internals ---
    def _deadline_of(self, req: wire.GenRequest) -> float:
        if req.timeout_s > 0:
            return self._clock() + req.timeout_s
        if req.deadline > 0:  # from a node that sends only the wall-clock form
            return self._clock() + (req.deadline - self._wall())
        return NO_DEADLINE

    def _may_retry(self, f: Flight) -> bool:
        return not f.started and f.local_origin and f.attempts < self.max_attempts

    def _retry(self, f: Flight) -> None:
        f.route = None
        f.held.clear()
        self._dispatch(f)

    def _dispatch(self, f: Flight) -> None:
        try:
            self._dispatch_unguarded(f)
        except Exception:  # a bug here must not strand the request: it ends now, with a reason
            log.exception("dispatching request %s failed", f.req.id)
            self._count("dispatch_errors")
            if f.route is not None:
                self.router.released(f.route.node)
                f.route = None
            self._unpark_one(f)
            self._fail(f, "internal", "the node could not route the request")

    def _dispatch_unguarded(self, f: Flight) -> None:
        while True:
            try:
                route = self._choose(f)
            except NoRoute as e:
                self._fail(f, *self._no_route(f, e))
                return
            if route is None:
                if self.problem:  # nothing to wait for: the engine is not coming back
                    self._fail(f, "engine_down", self.problem)
                else:
                    if f.parked_since is None:
                        f.parked_since = self._clock()
                    self.parked[f.req.id] = f
                return
            f.route = route
            f.parked_since = None
            f.tried.add(route.node)
            f.attempts += 1
            self.router.started(route.node)
            if self._send(route, self._outgoing(f, route)):
                return
            self.router.finished(route.node, ok=False)
            f.route = None
            if f.attempts >= self.max_attempts:
                self._fail(f, "engine_down", "no node could take the request")
                return

    def _outgoing(self, f: Flight, route: Route) -> wire.GenRequest:
        """The request as the next hop gets it: its deadline re-based, one more hop if it leaves."""
        req = f.req
        if f.deadline == NO_DEADLINE:
            return req if route.local else msgspec.structs.replace(req, hops=req.hops + 1)
        left = max(0.001, f.deadline - self._clock())
        return msgspec.structs.replace(req, timeout_s=left, deadline=self._wall() + left,
                                       hops=req.hops + (0 if route.local else 1))

    def _choose(self, f: Flight) -> Route | None:
        """The route for ``f``; None to park it until the local engine is back. Raises NoRoute."""
        req = f.req
        if not f.local_origin:  # routed here by another entry point: our engine or nothing
            local = [r for r in self.router.table.serving(req.model) if r.local]
            if not local:
                raise NoRoute("model_not_found", f"node {self.node_id} does not serve {req.model!r}")
            if self.engine_ready:
                return local[0]
            if self.held:
                return None  # a re-shard: brief, and the entry point has nowhere better to send it
            raise NoRoute("engine_down", f"the engine of node {self.node_id} is restarting")
        target = req.target_node or self._target
        try:
            route = self.router.pick(req.model, f.tried, target, chain=f.chain, work=_work(req))
        except NoRoute:
            if self._local_expected(req.model) and not target:
                return None  # our own engine served it and is (re)starting: wait for it
            raise
        if route.local and not self.engine_ready:
            try:  # another node may serve it now
                return self.router.pick(req.model, f.tried | {route.node}, target)
            except NoRoute:
                return None
        return route

    def _learn(self, chain: tuple[int, ...], done: wire.Done) -> None:
        """Our engine answered a request: a slot holds its prompt now, and its timings say how fast it is."""
        if chain:
            if chain in self.local_chains:
                self.local_chains.remove(chain)
            self.local_chains.append(chain)
            self.router.local_prefixes = tuple(self.local_chains)
        self.served_local += 1
        self.prefix_hits_local += done.cached_tokens > 0
        fresh = done.prompt_tokens - done.cached_tokens
        if done.prompt_s > 0 and fresh > 0:
            self.prefill_tps = _ewma(self.prefill_tps, fresh / done.prompt_s)
        if done.gen_s > 0 and done.completion_tokens > 1:
            self.decode_tps = _ewma(self.decode_tps, (done.completion_tokens - 1) / done.gen_s)
            self.router.local_decode_tps = self.decode_tps
        self.router.local_prefill_tps = self.prefill_tps
        self.local_changed = True

    def _local_expected(self, model: str) -> bool:
        """Is this node's engine expected back with ``model`` (it served it lately, it has not failed)?"""
        seen = self._seen_local.get(model)
        return (seen is not None and not self.problem and not self.engine_ready
                and self._clock() - seen <= self.recent_s)

    def _no_route(self, f: Flight, e: NoRoute) -> tuple[str, str]:
        model = f.req.model
        if self.problem and not self.models():  # this node should serve but cannot: say why
            return "engine_down", self.problem
        if e.code == "model_not_found" and model in self.recent_models():
            return "no_node", f"no node serves model {model!r} right now; retry shortly"
        return e.code, str(e)

    def _fail(self, f: Flight, code: str, message: str) -> None:
        if self.flights.pop(f.req.id, None) is None:
            return
        self._count("requests_failed")
        self._reply(f.origin, wire.Fail(id=f.req.id, code=code, message=message, started=f.started,
                                        node=self.node_id), None)

    def _send_quietly(self, route: Route, body: wire.Inference) -> None:
        try:
            self._send(route, body)
        except Exception:
            log.exception("sending %s to %s failed", type(body).__name__, route.node)

    def _unpark(self, force: bool = False) -> None:
        """Dispatch parked requests again (``force``: even if the engine is not ready)."""
        if not self.parked or not (force or self.engine_ready or self.router.table.routes):
            return
        parked, self.parked = self.parked, {}
        for f in parked.values():
            if f.req.id in self.flights:
                self._dispatch(f)

    def _unpark_one(self, f: Flight) -> None:
        self.parked.pop(f.req.id, None)

    def _left(self, route: Route) -> None:
        if route.local:
            self._check_idle()

    def _check_idle(self) -> None:
        if self.held and self._on_idle is not None and not any(
                f.route is not None and f.route.local for f in self.flights.values()):
            on_idle, self._on_idle = self._on_idle, None
            on_idle()


def _work(req: wire.GenRequest) -> tuple[float, float]:
    """(prompt tokens, answer tokens) a request will take, roughly: 4 characters a token, and
    max_tokens or the default answer length."""
    chars = len(req.prompt) if req.kind == "completion" else sum(len(m.content) + 8 for m in req.messages)
    return chars / 4.0, float(req.max_tokens or DEFAULT_WORK[1])


def _ewma(old: float, new: float) -> float:
    return new if old <= 0 else old + SPEED_WEIGHT * (new - old)
