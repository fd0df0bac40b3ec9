"""Gateway actor: carries requests to the chosen node and streams the replies back.

Sockets, all owned by the ``gateway-io`` thread:
- ``local``: ipc ROUTER in the state directory, for this node's HTTP workers;
- ``peers``: tcp ROUTER (CURVE) for requests routed here by other entry points (only with
  ``accept_routed``, i.e. a federated server);
- ``out``: one ROUTER (CURVE client) connected to every peer gateway we route to, each
  connection named by its endpoint (``CONNECT_ROUTING_ID``), and one monitor socket for it:
  two sockets whatever the cluster's size (a DEALER and a monitor per route hit libzmq's
  1023-socket cap near 500 routes);
- ``engine``: a DEALER to this node's inference engine process, while it is up.

Peers that fetch a model file this node holds ask for its pieces on ``peers`` too; the
depot's :class:`~zswarm.depot.shelf.Shelf` answers them inline (one ``pread``, rate-bounded).

What happens to each request (dispatch, retry, park, deadline) is decided by the pure
:class:`~zswarm.flights.Table`, which the io thread runs inline: a request is decoded, routed
and forwarded without leaving the thread; replies are passed through as raw bytes. The actor
side only feeds in control changes (routes, engine up/down) and answers status.
It must never block in the io thread, nor let a socket be touched from another thread.

Every request of the node passes through it and its table holds the ones in flight, which a
new Gateway could not answer: when it dies, the node stops (``node.py``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Any, Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from .. import wire
from ..balancing import Route, Router, RouteTable
from ..flights import Origin, Table
from ..token import Keys
from ..gate import Gate
from ..transport import SocketLoop, Stats, bind_private_ipc, curve_client, curve_server, link_options, tcp
from .base import GuardedActor, Watch

log = logging.getLogger(__name__)

TICK_S = 0.25  # deadline sweep
# A request carries the client's whole prompt: the HTTP app admits bodies up to 1 MiB, which
# encode to a little more; above the transport's default cap libzmq would drop the connection.
MAX_REQUEST_BYTES = 16 << 20
ASK_TIMEOUT_S = 2.0
NOT_MEMBER_WAIT_S = 0.5  # a fetcher whose record has not reached us yet asks again after this
_LINK_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class GatewayActor(GuardedActor):
    name = "gateway"

    def __init__(self, ctx: zmq.Context, node_id: str, local_endpoint: str, stats: Stats,
                 keys: Keys | None = None, listen: str | None = None, advertise_host: str = "127.0.0.1",
                 accept_routed: bool = False, policy: str = "prefix", target_node: str = "",
                 watch: Watch | None = None, own: tuple[bytes, bytes] | None = None,
                 admits: Callable[[bytes], bool] = lambda key: True, shelf: Any = None, slots: int = 1,
                 announce: Callable[..., None] | None = None):
        super().__init__(watch)
        # how the node's record learns what its engine has cached and how fast it is (io thread)
        self._announce = announce
        self._shelf = shelf  # depot.shelf.Shelf: model pieces for peers that fetch them (peers socket only)
        # is this client key (Z85) a current member's, and not revoked? Our gateway's key is in our
        # record, which a revoked machine saw while it was a member: it could dial us with a
        # fresh key (ZAP admits any key not revoked), and a link made before a revocation stays
        # up, so every request is checked
        self._admits = admits
        self._own = own  # this node's CURVE key pair (public, secret): what peers know it by
        self._ctx = ctx
        self._node_id = node_id
        self._local_endpoint = local_endpoint
        self._stats = stats
        self._keys = keys
        self._listen = listen
        self._advertise_host = advertise_host
        self._accept_routed = accept_routed and listen is not None
        self._loop: SocketLoop | None = None
        # io-thread state
        self._table = Table(node_id, Router(policy=policy), self._send, self._answer,
                            count=stats.inc, target_node=target_node, linked=lambda ep: ep in self._up,
                            slots=slots)
        self._links: set[str] = set()  # peer gateway endpoints ``out`` is connected to
        self._up: set[str] = set()  # ... of which the handshake has succeeded (and not dropped since)
        self._engine: zmq.Socket | None = None
        self._endpoint = ""

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
        self._submit(lambda: self._engine_failed(problem))

    def hold_engine(self, on_idle: Any) -> None:
        """Stop giving the engine new requests (they wait); call ``on_idle()`` once it has none."""
        self._submit(lambda: self._table.hold(on_idle))

    def release_engine(self) -> None:
        self._submit(self._table.release)

    def status(self) -> dict[str, Any]:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def _snap() -> None:
            t, router = self._table, self._table.router
            fut.set_result({
                "policy": router.policy,
                "in_flight": len(t.flights),
                "per_node_in_flight": dict(router.in_flight),
                "served": dict(router.served),
                "cooling": router.cooling(),
                "routes": [{"node": r.node, "name": r.name, "models": list(r.models), "local": r.local}
                           for r in router.table.routes],
                "links": {"wanted": len(self._links), "up": len(self._up)},
                "engine": self._engine is not None,
                "held": t.held,
                "parked": len(t.parked),
                "problem": t.problem,
                "prefix_routed": dict(router.prefix_routed),
                "engine_speed": {"prefill_tps": round(t.prefill_tps, 1), "decode_tps": round(t.decode_tps, 1)},
                "cached_prefixes": len(t.local_chains),
            })
        self._submit(_snap)
        return fut.result(timeout=ASK_TIMEOUT_S)

    def release(self) -> None:
        """On a stop and on a death alike: the io thread closes its sockets and ends."""
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
    def _tick(self) -> None:
        t = self._table
        t.tick()
        if t.local_changed and self._announce is not None:  # at most once a tick
            t.local_changed = False
            self._announce(prefixes=[list(c) for c in t.local_chains], prefill_tps=round(t.prefill_tps, 1),
                           decode_tps=round(t.decode_tps, 1), served=t.served_local,
                           prefix_hits=t.prefix_hits_local)

    def _setup(self, loop: SocketLoop) -> None:
        self._l = loop
        self._local = loop.socket(zmq.ROUTER, self._on_local)
        self._local.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        bind_private_ipc(self._local, self._local_endpoint)
        self._out = link_options(loop.socket(zmq.ROUTER, self._on_peer_reply))  # a dead link drops in seconds
        if self._keys is not None:  # without a token there is no cluster, so no peer to reach
            curve_client(self._out, self._keys, self._own)
        self._out.router_mandatory = True  # a send to no connection raises instead of vanishing
        # a dropped connection loses the peer's replies for good (its ROUTER forgets us), so
        # requests on it are retried at once instead of waiting for the ledger's verdict
        loop.add(self._out.get_monitor_socket(_LINK_EVENTS), self._on_link_event)
        self._peers = None
        if self._accept_routed:
            self._peers = link_options(loop.add(self._ctx.socket(zmq.ROUTER), self._on_peer, frames=True))
            self._peers.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
            curve_server(self._peers, self._keys, self._own)  # only members, and each known by its key
            loop.guard_socket(self._peers, Gate("gateway", self._stats))
            self._peers.bind(tcp(self._listen))
            port = self._peers.last_endpoint.decode().rsplit(":", 1)[1]
            self._endpoint = f"tcp://{self._advertise_host}:{port}"

    def _set_routes(self, table: RouteTable) -> None:
        wanted = {r.endpoint for r in table.routes if not r.local}
        for endpoint in self._links - wanted:
            self._links.discard(endpoint)
            self._up.discard(endpoint)
            try:
                self._out.disconnect(endpoint)
            except zmq.ZMQError:
                pass
        curves = {r.endpoint: r.curve for r in table.routes if not r.local}
        for endpoint in wanted - self._links:  # connect now, so the first request finds the link up
            try:
                # the peer's own key, from its signed record: nobody else can answer for it
                self._out.curve_serverkey = (curves.get(endpoint) or "").encode() or self._keys.curve_public
                self._out.setsockopt(zmq.CONNECT_ROUTING_ID, endpoint.encode())
                self._out.connect(endpoint)
            except zmq.ZMQError as e:  # a malformed endpoint in someone's record: that route stays down
                self._stats.inc("gateway_bad_endpoints")
                log.warning("cannot connect to gateway %s: %s", endpoint, e)
                continue
            self._links.add(endpoint)
        self._table.set_routes(table)

    def _on_link_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        endpoint = event["endpoint"].decode(errors="replace")
        if endpoint not in self._links:
            return
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._up.add(endpoint)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            self._up.discard(endpoint)
            self._stats.inc("gateway_peer_disconnects")
            self._table.link_lost(endpoint, "lost the connection to node {node}")

    def _engine_up(self, endpoint: str) -> None:
        if self._engine is not None:
            self._l.remove(self._engine)
        self._engine = self._l.socket(zmq.DEALER, self._on_engine_reply)
        self._engine.connect(endpoint)
        self._table.engine_up()

    def _engine_down(self, why: str) -> None:
        if self._engine is not None:
            self._l.remove(self._engine)
            self._engine = None
        self._table.engine_down(why)

    def _engine_failed(self, problem: str) -> None:
        if problem and self._engine is not None:
            self._l.remove(self._engine)
            self._engine = None
        self._table.engine_failed(problem)

    def _send(self, route: Route, body: wire.Inference) -> bool:
        """The table's way out: hand ``body`` to the route's node now, or say it cannot be."""
        payload = wire.encode_inference(self._node_id, body)
        try:
            if route.local:
                if self._engine is None:
                    return False
                self._engine.send(payload, zmq.NOBLOCK)
            else:
                if route.endpoint not in self._up:
                    return False  # queue nothing for a link that is down: another node may take it
                self._out.send_multipart([route.endpoint.encode(), payload], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # Again (queue full) or EHOSTUNREACH (the connection just dropped)
            return False

    def _answer(self, origin: Origin, body: wire.Inference, raw: bytes | None) -> None:
        kind, ident = origin
        sock = self._local if kind == "local" else self._peers
        payload = raw if raw is not None else wire.encode_inference(self._node_id, body)
        try:
            sock.send_multipart([ident, payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            self._stats.inc("gateway_reply_dropped")

    def _decode(self, payload: bytes) -> wire.Message | None:
        try:
            return wire.decode_inference(payload)
        except wire.BadFrame as e:
            self._stats.inc("gateway_bad_frames")
            log.debug("dropped a gateway frame: %s", e)
            return None

    def _on_local(self, frames: list[bytes]) -> None:
        self._on_request(frames, "local")

    def _on_peer(self, frames: list[zmq.Frame]) -> None:
        try:
            key = frames[-1].get("User-Id").encode()
        except (zmq.ZMQError, IndexError):
            key = b""
        if not self._admits(key):
            self._stats.inc("gateway_not_member")
            if len(frames) == 2 and (msg := self._decode(frames[1].bytes)) is not None:
                # a member we have not heard of yet (or one revoked): it may try another node, or later
                body, origin = msg.body, ("peer", frames[0].bytes)
                if isinstance(body, wire.PieceQuery):
                    self._answer(origin, wire.Piece(id=body.id, sha256=body.sha256, index=body.index,
                                                    wait_s=NOT_MEMBER_WAIT_S), None)
                elif isinstance(body, (wire.GenRequest, wire.ManifestQuery)):
                    self._answer(origin, wire.Fail(id=body.id, code="no_node", node=self._node_id,
                                                   message="this node does not know the sender as a member"), None)
            return
        self._on_request([f.bytes for f in frames], "peer")

    def _on_request(self, frames: list[bytes], kind: str) -> None:
        if len(frames) != 2:
            self._stats.inc("gateway_bad_frames")
            return
        ident, payload = frames
        msg = self._decode(payload)
        if msg is None:
            return
        origin = (kind, ident)
        match msg.body:
            case wire.GenRequest() as req:
                self._table.request(req, origin)
            case wire.Cancel(id=rid):
                self._table.cancel(rid, origin)
            case wire.ManifestQuery() | wire.PieceQuery() as q if kind == "peer" and self._shelf is not None:
                self._answer(origin, self._shelf.answer(self._node_id, q), None)
            case wire.ModelsQuery(id=qid):
                t = self._table
                reply = (wire.ModelsReply(qid, t.models(), t.problem, t.recent_models()) if kind == "local"
                         else wire.ModelsReply(qid, t.local_models()))
                self._answer(origin, reply, None)
            case _:
                self._stats.inc("gateway_bad_frames")

    def _on_engine_reply(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            self._stats.inc("gateway_bad_frames")
            return
        self._on_reply("", frames[0])

    def _on_peer_reply(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self._stats.inc("gateway_bad_frames")
            return
        self._on_reply(frames[0].decode(errors="replace"), frames[1])

    def _on_reply(self, source: str, payload: bytes) -> None:
        msg = self._decode(payload)
        if msg is not None:
            self._table.on_reply(source, msg.body, payload)
