"""Gateway actor: carries requests to the chosen node and streams the replies back.

Sockets, all owned by the ``gateway-io`` thread:
- ``local``: ipc ROUTER in the state directory, for this node's HTTP workers;
- ``peers``: tcp ROUTER (CURVE) for requests routed here by other entry points (only with
  ``accept_routed``, i.e. a federated server);
- one DEALER (CURVE) per peer gateway we send requests to;
- ``engine``: a DEALER to this node's inference engine process, while it is up.

The hot path never leaves the io thread: a request is decoded, routed by the thread's own
:class:`~zswarm.balancing.Router`, and forwarded; replies are passed through as raw bytes. The
actor side only feeds in control changes (routes, engine up/down) and answers status.

A request that fails before its first chunk (engine down, node gone, overloaded) is retried on
another node; once a chunk has gone to the client it cannot be, and the client gets a clear
error. Requests routed here from a peer are served by the local engine only (no second hop).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pykka
import zmq
from zmq.utils.monitor import parse_monitor_message

from .. import wire
from ..balancing import NoRoute, Route, Router, RouteTable
from ..token import Keys
from ..transport import SocketLoop, Stats, curve_client, curve_server, tcp

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # sends per request before giving up (a request that kills every engine stops here)
PARK_S = 120.0  # how long a request waits for this node's engine to (re)load before failing
RETRYABLE = {"engine_down", "overloaded", "no_node"}
TICK_S = 0.25  # deadline sweep
# A request carries the client's whole prompt: the HTTP app admits bodies up to 1 MiB, which
# encode to a little more; above the transport's default cap libzmq would drop the connection.
MAX_REQUEST_BYTES = 16 << 20
ASK_TIMEOUT_S = 2.0


@dataclass
class Flight:
    req: wire.GenRequest
    origin: tuple[str, bytes]  # ("local" | "peer", routing id)
    route: Route | None = None
    started: bool = False
    tried: set[str] = field(default_factory=set)
    attempts: int = 0
    t0: float = field(default_factory=time.monotonic)


class GatewayActor(pykka.ThreadingActor):
    def __init__(self, ctx: zmq.Context, node_id: str, local_endpoint: str, stats: Stats,
                 keys: Keys | None = None, listen: str | None = None, advertise_host: str = "127.0.0.1",
                 accept_routed: bool = False, policy: str = "p2c", target_node: str = ""):
        super().__init__()
        self._ctx = ctx
        self._node_id = node_id
        self._local_endpoint = local_endpoint
        self._stats = stats
        self._keys = keys
        self._listen = listen
        self._advertise_host = advertise_host
        self._accept_routed = accept_routed and listen is not None
        self._target = target_node
        self._router = Router(policy=policy)
        self._loop: SocketLoop | None = None
        # io-thread state
        self._flights: dict[str, Flight] = {}
        self._dealers: dict[str, zmq.Socket] = {}  # gateway endpoint -> DEALER
        self._monitors: dict[str, zmq.Socket] = {}  # gateway endpoint -> its DEALER's monitor
        self._engine: zmq.Socket | None = None
        self._held = False  # a re-shard is draining the engine: new local requests wait
        self._on_idle: Any = None  # called once the held engine has nothing in flight
        self._parked: list[Flight] = []  # requests waiting for the local engine
        self._endpoint = ""
        self._problem = ""  # why the local engine cannot serve at all (engine_failed); "" if none

    # --- API (actor thread) ---
    def open(self) -> str:
        """Bind; returns our peer-facing gateway endpoint ("" when not accepting routed requests)."""
        loop = SocketLoop("gateway-io", self._ctx, self._setup, TICK_S, self._tick)
        loop.start_and_wait()
        self._loop = loop
        return self._endpoint

    def set_routes(self, table: RouteTable) -> None:
        self._submit(lambda: self._set_routes(table))

    def engine_up(self, endpoint: str) -> None:
        self._submit(lambda: self._engine_up(endpoint))

    def engine_down(self, why: str) -> None:
        self._submit(lambda: self._engine_down(why))

    def engine_failed(self, problem: str) -> None:
        """The local engine will not come back by itself (it died the same way before it was
        ready, again and again): a request with no other route fails at once with ``problem``.
        ``""``: it is being tried again (requests wait for it as before)."""
        def _failed() -> None:
            self._problem = problem
            if not problem:
                return
            self._engine_down(problem)
            parked, self._parked = self._parked, []
            for f in parked:
                if f.req.id in self._flights:
                    self._dispatch(f)
        self._submit(_failed)

    def hold_engine(self, on_idle: Any) -> None:
        """Stop giving the engine new requests (they wait); call ``on_idle()`` once it has none."""
        def _hold() -> None:
            self._held, self._on_idle = True, on_idle
            self._check_idle()
        self._submit(_hold)

    def release_engine(self) -> None:
        def _release() -> None:
            self._held, self._on_idle = False, None
            self._unpark()
        self._submit(_release)

    def status(self) -> dict[str, Any]:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def _snap() -> None:
            fut.set_result({
                "policy": self._router.policy,
                "in_flight": len(self._flights),
                "per_node_in_flight": dict(self._router.in_flight),
                "served": dict(self._router.served),
                "cooling": self._router.cooling(),
                "routes": [{"node": r.node, "name": r.name, "models": list(r.models), "local": r.local}
                           for r in self._router.table.routes],
                "engine": self._engine is not None,
                "held": self._held,
                "parked": len(self._parked),
                "problem": self._problem,
            })
        self._submit(_snap)
        return fut.result(timeout=ASK_TIMEOUT_S)

    def on_stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        path = self._local_endpoint[len("ipc://"):]
        try:
            os.unlink(path)
        except OSError:
            pass

    def _submit(self, fn) -> None:
        if self._loop is not None:
            self._loop.submit(fn)

    # --- io thread ---
    def _setup(self, loop: SocketLoop) -> None:
        self._l = loop
        path = self._local_endpoint[len("ipc://"):]
        if os.path.exists(path):
            os.unlink(path)
        self._local = loop.socket(zmq.ROUTER, self._on_local)
        self._local.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        self._local.bind(self._local_endpoint)
        os.chmod(path, 0o600)
        self._peers = None
        if self._accept_routed:
            self._peers = loop.socket(zmq.ROUTER, self._on_peer)
            self._peers.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
            curve_server(self._peers, self._keys)
            self._peers.bind(tcp(self._listen))
            port = self._peers.last_endpoint.decode().rsplit(":", 1)[1]
            self._endpoint = f"tcp://{self._advertise_host}:{port}"

    def _set_routes(self, table: RouteTable) -> None:
        self._router.table = table
        live = {r.node for r in table.routes}
        wanted = {r.endpoint for r in table.routes if not r.local}
        for endpoint in list(self._dealers):
            if endpoint not in wanted:
                self._close_dealer(endpoint)
        for endpoint in wanted:
            self._dealer(endpoint)  # connect now, so the first request finds the link up
        for f in list(self._flights.values()):
            if f.route is not None and f.route.node not in live:
                self._lost(f, f"node {f.route.name or f.route.node} left the cluster")

    def _close_dealer(self, endpoint: str) -> None:
        sock = self._dealers.pop(endpoint)
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._l.remove(self._monitors.pop(endpoint))
        self._l.remove(sock)

    def _engine_up(self, endpoint: str) -> None:
        if self._engine is not None:
            self._l.remove(self._engine)
        self._engine = self._l.socket(zmq.DEALER, lambda frames: self._on_reply(frames, ""))
        self._engine.connect(endpoint)
        self._held, self._on_idle = False, None
        self._problem = ""
        self._unpark()

    def _engine_ready(self) -> bool:
        return self._engine is not None and not self._held

    def _unpark(self) -> None:
        if not self._engine_ready():
            return
        parked, self._parked = self._parked, []
        for f in parked:
            if f.req.id in self._flights:
                self._dispatch(f)

    def _check_idle(self) -> None:
        if self._held and self._on_idle is not None and not any(
                f.route is not None and f.route.local for f in self._flights.values()):
            on_idle, self._on_idle = self._on_idle, None
            on_idle()

    def _engine_down(self, why: str) -> None:
        if self._engine is not None:
            self._l.remove(self._engine)
            self._engine = None
        for f in list(self._flights.values()):
            if f.route is not None and f.route.local:
                f.tried.discard(f.route.node)  # the engine comes back fresh: it may take the retry
                self._lost(f, why)

    def _dealer(self, endpoint: str) -> zmq.Socket:
        sock = self._dealers.get(endpoint)
        if sock is None:
            sock = self._l.socket(zmq.DEALER, lambda frames, src=endpoint: self._on_reply(frames, src))
            curve_client(sock, self._keys)
            sock.immediate = True  # queue only on a live connection: a dead peer fails the send now
            # a dropped connection loses the peer's replies for good (its ROUTER forgets us),
            # so requests on it are retried at once instead of waiting for the ledger's verdict
            monitor = self._l.add(sock.get_monitor_socket(zmq.EVENT_DISCONNECTED),
                                  lambda frames, endpoint=endpoint: self._on_disconnect(endpoint, frames))
            sock.connect(endpoint)
            self._dealers[endpoint] = sock
            self._monitors[endpoint] = monitor
        return sock

    def _on_disconnect(self, endpoint: str, frames: list[bytes]) -> None:
        parse_monitor_message(frames)
        self._stats.inc("gateway_peer_disconnects")
        for f in list(self._flights.values()):
            if f.route is not None and f.route.endpoint == endpoint:
                self._lost(f, f"lost the connection to node {f.route.name or f.route.node}")

    def _decode(self, payload: bytes) -> wire.Message | None:
        try:
            return wire.decode_inference(payload)
        except wire.BadFrame as e:
            self._stats.inc("gateway_bad_frames")
            log.debug("dropped a gateway frame: %s", e)
            return None

    def _on_local(self, frames: list[bytes]) -> None:
        self._on_request(frames, "local")

    def _on_peer(self, frames: list[bytes]) -> None:
        self._on_request(frames, "peer")

    def _on_request(self, frames: list[bytes], kind: str) -> None:
        if len(frames) != 2:
            self._stats.inc("gateway_bad_frames")
            return
        ident, payload = frames
        msg = self._decode(payload)
        if msg is None:
            return
        match msg.body:
            case wire.GenRequest() as req:
                if req.id in self._flights or req.hops > 1:
                    self._reply((kind, ident), wire.Fail(id=req.id, code="bad_request", node=self._node_id,
                                                         message="duplicate request id or routing loop"))
                    return
                f = Flight(req, (kind, ident))
                self._flights[req.id] = f
                self._stats.inc("requests_in")
                self._dispatch(f)
            case wire.Cancel(id=rid):
                f = self._flights.pop(rid, None)
                if f is not None and f.origin == (kind, ident):
                    self._stats.inc("requests_cancelled")
                    self._to_route(f, wire.Cancel(rid))
                    if f.route is not None:
                        self._router.finished(f.route.node, ok=True)
                        if f.route.local:
                            self._check_idle()
                elif f is not None:
                    self._flights[rid] = f  # only the request's own client may cancel it
            case wire.ModelsQuery(id=qid):
                models = self._router.table.models() if kind == "local" else self._local_models()
                self._reply((kind, ident), wire.ModelsReply(qid, models, self._problem if kind == "local" else ""))
            case _:
                self._stats.inc("gateway_bad_frames")

    def _local_models(self) -> list[str]:
        return sorted({m for r in self._router.table.routes if r.local for m in r.models})

    def _dispatch(self, f: Flight) -> None:
        req = f.req
        while True:
            try:
                route = self._choose(f)
            except NoRoute as e:
                # the failed engine's reason, unless the cluster serves models and not this one
                failed = self._problem and not self._router.table.models()
                code, message = ("engine_down", self._problem) if failed else (e.code, str(e))
                self._finish(f, wire.Fail(id=req.id, code=code, message=message, node=self._node_id))
                return
            if route is None and self._problem:  # nothing to wait for: the engine is not coming back
                self._finish(f, wire.Fail(id=req.id, code="engine_down", message=self._problem, node=self._node_id))
                return
            if route is None:  # waits for this node's engine
                f.route = None
                self._parked.append(f)
                return
            f.route = route
            f.tried.add(route.node)
            f.attempts += 1
            self._router.started(route.node)
            if self._to_route(f, req):
                return
            self._router.finished(route.node, ok=False)
            if f.attempts >= MAX_ATTEMPTS:
                self._finish(f, wire.Fail(id=req.id, code="engine_down", node=self._node_id,
                                          message="no node could take the request"))
                return

    def _choose(self, f: Flight) -> Route | None:
        """The route for ``f``; None to park it until the local engine is back. Raises NoRoute."""
        req = f.req
        if f.origin[0] == "peer":  # routed here by another entry point: our engine or nothing
            local = [r for r in self._router.table.serving(req.model) if r.local]
            if not local:
                raise NoRoute("model_not_found", f"node {self._node_id} does not serve {req.model!r}")
            if self._engine_ready():
                return local[0]
            if self._held:
                return None  # a re-shard: brief, and the entry point has nowhere better to send it
            raise NoRoute("engine_down", f"the engine of node {self._node_id} is restarting")
        target = req.target_node or self._target
        route = self._router.pick(req.model, f.tried, target)
        if route.local and not self._engine_ready():
            try:  # another node may serve it now
                return self._router.pick(req.model, f.tried | {route.node}, target)
            except NoRoute:
                return None
        return route

    def _to_route(self, f: Flight, body: wire.Inference) -> bool:
        route = f.route
        if route is None:
            return False
        if isinstance(body, wire.GenRequest) and not route.local:
            body = msgspec.structs.replace(body, hops=body.hops + 1)
        payload = wire.encode_inference(self._node_id, body)
        sock = self._engine if route.local else self._dealer(route.endpoint)
        if sock is None:
            return False
        try:
            sock.send(payload, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _on_reply(self, frames: list[bytes], source: str) -> None:
        """A reply from the engine (``source`` "") or from the peer gateway at ``source``."""
        if len(frames) != 1:
            self._stats.inc("gateway_bad_frames")
            return
        msg = self._decode(frames[0])
        if msg is None:
            return
        body = msg.body
        rid = getattr(body, "id", None)
        f = self._flights.get(rid) if isinstance(rid, str) else None
        if f is None or f.route is None or f.route.endpoint != source:
            return  # a late reply: the request was cancelled, timed out, or moved to another node
        match body:
            case wire.Chunk():
                if not f.started:
                    f.started = True
                    self._stats.inc("first_chunks")
                self._send_origin(f.origin, frames[0])
            case wire.Done():
                self._router.finished(f.route.node, ok=True)
                del self._flights[rid]
                self._stats.inc("requests_done")
                self._send_origin(f.origin, frames[0])
                if f.route.local:
                    self._check_idle()
            case wire.Fail(code=code):
                self._router.finished(f.route.node, ok=code not in RETRYABLE)
                if not f.started and code in RETRYABLE and f.attempts < MAX_ATTEMPTS and f.origin[0] == "local":
                    self._stats.inc("requests_retried")
                    was_local = f.route.local
                    self._dispatch(f)
                    if was_local:
                        self._check_idle()
                    return
                del self._flights[rid]
                self._stats.inc("requests_failed")
                self._send_origin(f.origin, frames[0])
                if f.route.local:
                    self._check_idle()
            case _:
                self._stats.inc("gateway_bad_frames")

    def _lost(self, f: Flight, why: str) -> None:
        """The node serving ``f`` is gone: retry if nothing was streamed yet, else fail cleanly."""
        if f.route is not None:
            self._router.finished(f.route.node, ok=False)
        was_local = f.route is not None and f.route.local
        f.route = None
        if not f.started and f.origin[0] == "local" and f.attempts < MAX_ATTEMPTS:
            self._stats.inc("requests_retried")
            self._dispatch(f)
        else:
            self._finish(f, wire.Fail(id=f.req.id, code="engine_down", started=f.started, node=self._node_id,
                                      message=f"{why}; the answer was cut short" if f.started else why))
        if was_local:
            self._check_idle()

    def _finish(self, f: Flight, fail: wire.Fail) -> None:
        self._flights.pop(f.req.id, None)
        self._stats.inc("requests_failed")
        self._reply(f.origin, fail)

    def _reply(self, origin: tuple[str, bytes], body: wire.Inference) -> None:
        self._send_origin(origin, wire.encode_inference(self._node_id, body))

    def _send_origin(self, origin: tuple[str, bytes], payload: bytes) -> None:
        kind, ident = origin
        sock = self._local if kind == "local" else self._peers
        try:
            sock.send_multipart([ident, payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            self._stats.inc("gateway_reply_dropped")

    def _tick(self) -> None:
        now = time.time()
        mono = time.monotonic()
        self._parked = [f for f in self._parked if f.req.id in self._flights]  # drop cancelled ones
        for f in [f for f in self._parked if mono - f.t0 > PARK_S]:
            self._parked.remove(f)
            self._finish(f, wire.Fail(id=f.req.id, code="engine_down", node=self._node_id,
                                      message=f"the model did not come back within {PARK_S:.0f} s"))
        for f in list(self._flights.values()):
            if f.req.deadline and now > f.req.deadline:
                self._to_route(f, wire.Cancel(f.req.id))
                if f.route is not None:
                    self._router.finished(f.route.node, ok=False)
                self._finish(f, wire.Fail(id=f.req.id, code="timeout", started=f.started, node=self._node_id,
                                          message="the request's deadline passed"))
