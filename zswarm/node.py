"""The one place that starts a node: actors in dependency order, stopped in reverse.

A node is a process holding pykka actors: Ledger (gossip), Discovery, Admin; the Gateway,
Balancer and RPCSupervisor join the same sequence. Start-up asks each actor to ``open()`` (bind)
with a timeout, so a port in use is one clear error line, not a traceback. Before any of that it
checks the model file and binds the HTTP socket itself (:mod:`.startup`); and a child that can
never start (the supervisor's ``on_fatal``) stops the node too: one line, exit status 1. SIGTERM and SIGINT
stop the node gracefully (the Ledger announces the leave); SIGUSR1 logs every thread's stack.

An actor that fails a message lives on (its guard, :mod:`.actors.base`, logs and counts it); one
that dies is noticed by the main thread, which looks at every actor each ``POLL_S``
(:meth:`Node.watch_actors`): it says so in the log and in ``zswarm admin status``, then restarts
that actor or stops the node, one line and exit status 1, by the policy at :data:`RESTARTS_MAX`.

Stopping is bounded, whatever the node is doing: :func:`run` starts the node in a helper thread so
that the main thread sees SIGTERM at once, even while start-up still waits on an actor, and
:meth:`Node.stop` gives the actors, the children and the Leave ``STOP_BUDGET_S`` in all. What is
still running then (an actor stuck in a call, a child ignoring SIGTERM) is killed or abandoned,
logged as a bug, and the process exits anyway.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka
import pykka.debug
import zmq

from . import __version__, wire
from .actors.admin import AdminActor
from .actors.balancer import BalancerActor
from .actors.base import Watch
from .actors.discovery import DiscoveryActor
from .actors.gateway import GatewayActor
from .actors.ledger import BindError, LedgerActor
from .actors.listener import notify
from .actors.sharder import ENGINE_REPORTS, PlanBox
from .actors.supervisor import RESTARTING, ChildSpec, SupervisorActor
from .config import is_loopback
from .membership import Timing
from .meminfo import memory_bytes
from .startup import StartError, check_model, listen_http, raise_nofile
from .state import StateDir, StateDirError
from . import tokenstore
from .token import Token
from .tokenstore import ClusterState
from .transport import SocketLoop, Stats, ZapHandler
from .trust import Limits
from .tunnel import TunnelEntry, TunnelExit

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
# SIGTERM to exit: 2 s (what the tests and an operator may expect). The actors, the children and
# the Leave share STOP_BUDGET_S; the interpreter's own exit takes the rest.
STOP_BUDGET_S = 1.2
CHILDREN_STOP_S = 0.7  # of the budget: by then the supervisor has stopped its children, or they get SIGKILL
POLL_S = 0.05  # how often the main thread looks at its signals (a handler only appends to a list) and actors

# When an actor dies (a bug: its guard keeps it alive through any failed message), the node
# starts a new one if it has a restart step (Node._restarts): the Balancer, which keeps nothing
# that the Ledger and the engine's model cannot tell a new one. Any other actor's death stops
# the node, one line and exit status 1, and systemd starts it again in a known state: the node
# cannot do its job without it, or a new one could not take over what the dead one held. The
# Ledger is the node's membership; the Gateway carries every request and holds those in flight;
# the RPCSupervisor's children are stopped with it rather than left unsupervised; the Sharder
# holds the claims, tunnels and plan of the running engine; without the Admin nobody could ask
# what happened; Discovery: see its module.
RESTARTS_MAX = 3  # restarts of one actor within RESTART_WINDOW_S; one more death stops the node
RESTART_WINDOW_S = 60.0  # (an actor that keeps dying would otherwise be restarted in a tight loop)


# llama.cpp's RPC server announces each client connection (a memory probe, then the server's, at
# every load): the worker's log at DEBUG, not INFO
RPC_CHATTER = ("Accepted client connection", "Client connection closed")


class StartCancelled(Exception):
    """The node began stopping (SIGTERM, SIGINT) while it was still starting."""


@dataclass
class ServeSettings:
    """The local inference engine (server role)."""

    model: str | None = None  # GGUF path; None: the embedded SmolLM2
    ctx_size: int = 2048
    threads: int = 0  # 0: one per core
    parallel: int = 1
    prompt_cache: int = 256 << 20  # bytes of saved prompt states (the engine's --prompt-cache)
    max_queue: int = 128
    # worker mode (server side)
    rpc_servers: list[str] = field(default_factory=list)  # static mode: "host:port" of RPC servers
    local_layers: bool = True  # the server's own memory takes a share of the layers
    mem: int = 0  # bytes the server offers for its own share (0: what is available)
    reshard_settle_s: float = 5.0  # at most one re-shard per this period: joins come in bursts
    max_worker_mem: int = 1 << 40  # the most one worker's memory claim counts for
    # models travel (depot/)
    models_dir: str | None = None  # None: STATE_DIR/models
    models_max: int = 0  # bytes; 0: no cap
    share_rate: int = 64 << 20  # bytes/s to fetching peers, all together; 0: no limit


@dataclass
class WorkerSettings:
    """A worker's llama.cpp RPC server."""

    mem: int = 0  # bytes offered (0: what is available)
    threads: int = 0
    cache_dir: str | None = None  # the tensor cache (None: STATE/tensor-cache)
    cache_max: int = 4 << 30  # its bound (0: no tensor cache)
    listen: str | None = None  # static mode (no p2p): where the RPC server itself listens


@dataclass
class HttpSettings:
    address: str = "127.0.0.1:8080"
    api_keys: list[str] = field(default_factory=list)
    workers: int = 1
    request_timeout_s: float = 600.0  # config.DEFAULT_REQUEST_TIMEOUT_S


@dataclass
class NodeSettings:
    role: str  # "server", "federated" or "worker"
    token: Token | None  # None: no cluster (a plain `zswarm server`)
    state_dir: str
    p2p_listen: str = "0.0.0.0:7340"
    advertise: str | None = None
    bootstrap: list[str] = field(default_factory=list)
    mdns: bool = True
    mdns_interfaces: list[str] = field(default_factory=list)
    local_only: bool = False
    name: str = "node"
    # the name is the host's (no --name): the node id's first 4 characters are added, so that
    # nodes sharing a host are told apart in split bars, tables and logs
    name_is_host: bool = False
    federated: bool = False  # serve requests routed from the cluster, and route to it
    policy: str = "prefix"
    target_node: str = ""
    serve: ServeSettings | None = None
    http: HttpSettings | None = None
    worker: WorkerSettings | None = None
    timing: Timing = field(default_factory=Timing)
    limits: Limits = field(default_factory=Limits)  # trust.py: nodes held, nodes one peer may introduce
    child_hang_s: float = 10.0  # config.py's --child-hang: 0 never kills a child for silence
    child_stuck_s: float = 120.0  # config.py's --child-stuck

    @property
    def p2p(self) -> bool:
        return self.token is not None


def advertise_host(listen: str, advertise: str | None) -> str:
    if advertise:
        host = advertise.rsplit(":", 1)[0] if advertise.count(":") == 1 else advertise
        return host
    host = listen.rsplit(":", 1)[0]
    if host not in ("0.0.0.0", "*", ""):
        return host
    from .actors.discovery import _ipv4_addresses

    return _ipv4_addresses()[0]


class Node:
    """Holds the running actors. :func:`run` calls :meth:`start` in a helper thread and
    :meth:`stop` from the main thread, possibly while :meth:`start` is still running."""

    def __init__(self, settings: NodeSettings):
        self.s = settings
        self.stats = Stats()
        self.watch = Watch(self.stats)  # how actors say they failed; the admin status shows it
        self.state = StateDir(settings.state_dir).claim()  # StateDirError: one line, nothing bound
        self.identity = self.state.identity()  # StateDirError too (a damaged identity file)
        if settings.name_is_host:
            settings.name = f"{settings.name}-{self.identity.node_id[:4]}"
        self.cluster: ClusterState | None = None  # the token now (a rotation changes it) and who is revoked
        if settings.token is not None:
            self.cluster, note = tokenstore.resolve(self.state.path, settings.token)
            if note:
                log.warning("%s", note)
        self.keys = self.cluster.token.derive() if self.cluster else None
        self.ctx = zmq.Context()
        self.zap = ZapHandler(self.ctx, self.keys, self.stats) if self.keys else None
        if self.zap is not None:
            self.zap.deny(frozenset(r.curve.encode() for r in self.cluster.revoked))
        self._member_keys: frozenset[bytes] = frozenset()  # members' own CURVE keys (Z85), from the ledger
        self._admin_ref: pykka.ActorRef | None = None
        self._discovery_ref: pykka.ActorRef | None = None
        self.actors: list[pykka.ActorRef] = []
        self.record: wire.NodeRecord | None = None
        self.http_url = ""
        self.plan_box = PlanBox()
        self.tunnel_exit: TunnelExit | None = None
        self.rpc_channel = None  # the RPC child's end of its connection broker, kept for its restarts
        self._lock = threading.Lock()  # self.actors and self._closed, between start() and stop()
        self._closed = False  # stop() has begun: start() creates no more actors
        self._starting = False
        self.http_sock = None  # the API's listening socket, bound here, inherited by gunicorn
        self.fatal: list[str] = []  # why a child can never start, or an actor died: run() stops, exits 1
        self.balancer: pykka.ActorRef | None = None  # the current one (watch_actors may replace it)
        self._engine_model = ""  # the local engine's model, once it was up: a new Balancer hears it
        self._restarts: dict[type, Any] = {}  # actor class -> the step that starts a new one
        self._restarted: dict[str, list[float]] = {}  # actor name -> when it was restarted (monotonic)
        self._dead_seen: set[str] = set()  # urns of actors seen dead once, without a word yet
        # models travel (depot/): the model this node waits for from peers ("" none), its pieces' server
        self._fetching = ""
        self._model_path = ""  # the file it serves, once check_model found it
        self.shelf: Any = None
        self._gateway: Any = None  # the gateway's proxy, and what the engine starts with once fetched
        self._engine_args: tuple = ()

    def start(self) -> wire.NodeRecord:
        self._starting = True
        try:
            return self._start_all()
        finally:
            self._starting = False

    def _start_all(self) -> wire.NodeRecord:
        s = self.s
        raise_nofile()  # children inherit it
        # Start-up mistakes first, before anything binds or starts: one line (StartError).
        self._fetching = self._model_to_fetch()  # --model NAME that no file here holds: from peers
        self._tensor_cache = self._prepare_tensor_cache()
        if s.serve is not None and not self._fetching:
            self._model_path = check_model(s.serve.model)  # the embedded model's path when none was given
        if s.http is not None:
            self.http_sock = listen_http(s.http.address)
        node_id = self.identity.node_id
        total, avail = memory_bytes()
        flags = ["federated"] if s.federated else []
        own = wire.NodeRecord(
            id=node_id, name=s.name, role=s.role, incarnation=time.time_ns() // 1000,
            software=__version__, started_at=time.time(), mem_total=total, mem_free=avail, flags=flags,
            key=self.identity.public, curve=self.identity.curve_public.decode())
        host = advertise_host(s.p2p_listen, s.advertise)
        ledger = discovery = None
        if s.p2p:
            # ZAP first: a CURVE socket bound before a handler runs would let anyone in.
            self.zap.start()
            ledger = self._start(LedgerActor, self.ctx, self.keys, self.identity, own, s.p2p_listen, host,
                                 self.stats, s.timing, self.state.path / "peers.json", limits=s.limits,
                                 on_change=self._ledger_changed, cluster=self.cluster, on_rotation=self._rotated)
            own = ledger.proxy().open().get(timeout=START_TIMEOUT_S)
        self.record = own
        routes_peers = s.p2p and (s.federated or s.role == "federated")
        gateway = supervisor = None
        if s.role == "worker":
            supervisor = self._start(SupervisorActor, self.stats, s.child_hang_s, s.child_stuck_s)
        if s.role in ("server", "federated"):
            gateway = self._start(GatewayActor, self.ctx, node_id, self.state.endpoint("gateway"), self.stats,
                                  self.keys, next_port(s.p2p_listen, 1) if s.p2p else None, host,
                                  s.p2p and s.federated and s.serve is not None, s.policy, s.target_node,
                                  own=self._own_keys(), admits=self._admits, shelf=self._shelf(),
                                  slots=s.serve.parallel if s.serve is not None else 1,
                                  announce=self._announcer(ledger))
            endpoint = gateway.proxy().open().get(timeout=START_TIMEOUT_S)
            if endpoint and ledger is not None:
                ledger.proxy().update_own(endpoints={**own.endpoints, "gateway": endpoint}).get(timeout=START_TIMEOUT_S)
            self._start_balancer(node_id, gateway, ledger, routes_peers)
            self._restarts[BalancerActor] = lambda: self._start_balancer(node_id, gateway, ledger, routes_peers)
            supervisor = self._start(SupervisorActor, self.stats, s.child_hang_s, s.child_stuck_s)
        if ledger is not None:
            port = int(own.endpoints["gossip"].rsplit(":", 1)[1])
            bootstrap = [] if s.local_only else list(dict.fromkeys(list(self.cluster.token.bootstrap) + s.bootstrap))
            discovery = self._start(DiscoveryActor, ledger.proxy(), self.keys, node_id, s.role, bootstrap,
                                    s.mdns, s.mdns_interfaces, port, self.stats)
            discovery.proxy().status().get(timeout=START_TIMEOUT_S)  # answers once on_start has run
            self._discovery_ref = discovery
        facts = {"id": node_id, "role": s.role, "network_id": self.keys.network_id if self.keys else None,
                 "state_dir": str(self.state.path), "flags": flags}
        admin = self._start(AdminActor, self.ctx, self.state.admin_endpoint, str(self.state.admin_socket),
                            facts, own, ledger.proxy() if ledger else None,
                            discovery.proxy() if discovery else None, self.stats,
                            gateway.proxy() if gateway else None, supervisor.proxy() if supervisor else None,
                            self.cluster.token.encode() if self.cluster else "")
        admin.proxy().open().get(timeout=START_TIMEOUT_S)
        self._admin_ref = admin
        if ledger is not None and s.serve is not None:
            self._start_depot(ledger, gateway, admin)
        if gateway is not None:
            self._start_children(node_id, supervisor, gateway, ledger, admin)
        if s.worker is not None:
            self._start_worker(admin, ledger, total, avail)
        return self.record

    def _ledger_changed(self, records: list[wire.NodeRecord], states: dict[str, str]) -> None:
        """After every change of the ledger (in its thread): whose requests the gateway takes,
        whom a worker's tunnel exit serves."""
        self._member_keys = frozenset(r.curve.encode() for r in records if r.curve)
        exit_ = self.tunnel_exit
        if exit_ is not None:  # a worker: only the server whose split it serves opens streams
            from .sharding import Claim, holders
            claims = [Claim(r.id, c.worker, c.since, c.held) for r in records for c in r.claims]
            held = holders(claims, states).get(self.identity.node_id)
            server = next((r for r in records if held is not None and r.id == held.server), None)
            exit_.admit(frozenset([server.curve.encode()]) if server is not None and server.curve else frozenset())

    def _rotated(self, cluster: ClusterState, newly_revoked: list[wire.Revoked]) -> None:
        """The operator revoked nodes and/or moved the cluster to a new token (the ledger believed
        the statement; its thread: nothing here blocks). Kept in the state directory, so that a
        restart with the old token resumes with this one and the revoked stay out."""
        old = self.cluster
        self.cluster = cluster
        tokenstore.save(self.state.path, cluster)
        self.zap.deny(frozenset(r.curve.encode() for r in cluster.revoked))
        if old is not None and cluster.token != old.token:
            self.keys = cluster.token.derive()
            for ref, method, arg in ((self._admin_ref, "set_token", cluster.token.encode()),
                                     (self._discovery_ref, "set_keys", self.keys)):
                try:
                    if ref is not None:
                        getattr(ref.proxy(), method)(arg)  # a tell in effect: the future is not waited for
                except pykka.ActorDeadError:
                    pass  # it died meanwhile; the node's watch replaces or stops it

    def _admits(self, key: bytes) -> bool:
        """The gateway (its io thread): may this client key's requests be served? A member's own
        key only (a revoked node's record is gone from the ledger, so is its key from here)."""
        return key in self._member_keys

    def _own_keys(self) -> tuple[bytes, bytes]:
        """This node's CURVE key pair (public, secret), derived from its identity."""
        return self.identity.curve_public, self.identity.curve_secret

    def _start_balancer(self, node_id: str, gateway: pykka.ActorRef, ledger: pykka.ActorRef | None,
                        route_to_peers: bool) -> None:
        """The Balancer and what it hears; also how a new one replaces one that died (main thread).
        Nothing here waits: the Ledger and the local engine's model tell it everything it needs."""
        balancer = self._start(BalancerActor, node_id, self.s.name, gateway.proxy(),
                               ledger.proxy() if ledger else None, route_to_peers)
        self.balancer = balancer
        if ledger is not None:
            ledger.proxy().add_listener(balancer)
            notify([balancer], "ledger_changed")  # the peers known already
        if self._engine_model:
            notify([balancer], "engine_up", model=self._engine_model)

    @staticmethod
    def _announcer(ledger: pykka.ActorRef | None) -> Any:
        """How the gateway puts its engine's cached prefixes and speed in our record (not waited for)."""
        if ledger is None:
            return None
        proxy = ledger.proxy()

        def announce(**fields: Any) -> None:
            try:
                proxy.update_own(**fields)
            except pykka.ActorDeadError:
                pass  # the node stops, or replaces it
        return announce

    # --- models travel (depot/) ---
    def _prepare_tensor_cache(self) -> str | None:
        """A worker's tensor cache folder, made and trimmed to --cache-max (None: none)."""
        w = self.s.worker
        if w is None or not w.cache_max:
            return None
        from .tensorcache import FOLDER, prepare

        path = Path(w.cache_dir) if w.cache_dir else self.state.path / FOLDER
        try:
            kept = prepare(path, w.cache_max)
        except OSError as e:
            raise StartError(f"cannot use the tensor cache folder {path} (--cache-dir): {e.strerror or e}; "
                             "give another folder, or --cache-max 0 for no cache", 2) from None
        log.info("tensor cache in %s (%.0f MiB kept, at most %.0f MiB)", path, kept / (1 << 20),
                 w.cache_max / (1 << 20))
        return str(path)

    def _model_to_fetch(self) -> str:
        """``--model NAME`` (or a digest) that is no file here: a file fetched before, in the models
        directory, is served as it is; else the name is fetched from peers (p2p only)."""
        from .depot.store import ModelsDir
        from .depot.target import fetch_target

        serve = self.s.serve
        if serve is None:
            return ""
        models = ModelsDir(self._models_root())
        if self.s.p2p:  # the depot keeps fetched models there: a directory it cannot make is a start-up mistake
            try:
                models.ensure()
            except OSError as e:
                raise StartError(f"cannot use the models directory {models.root} (--models-dir): "
                                 f"{e.strerror or e}", 2) from None
        target = fetch_target(serve.model)
        if target is None:
            return ""
        held = models.find(target)
        if held is not None:
            log.info("model %s: %s (fetched from peers before)", target, held.path)
            serve.model = held.path
            return ""
        if not self.s.p2p:
            raise StartError(f"no model file {serve.model!r}; to fetch model {target} from the cluster's "
                             "peers, run with --p2p (and the cluster's token)", 2)
        return target

    def _models_root(self) -> str:
        return self.s.serve.models_dir or str(self.state.path / "models")

    def _shelf(self) -> Any:
        """The model files this node gives peers: only a federated server's gateway takes peers' queries."""
        s = self.s
        if not (s.p2p and s.federated and s.serve is not None):
            return None
        from .depot.shelf import Shelf

        # a lying holder, for tests/test_models_travel.py: "all" or piece numbers ("manifest:0,5":
        # and a manifest that matches those pieces, so only the whole file's digest finds it out)
        corrupt = os.environ.get("ZSWARM_TEST_CORRUPT_PIECES", "")
        lie, corrupt = corrupt.startswith("manifest:"), corrupt.removeprefix("manifest:")
        self.shelf = Shelf(s.serve.share_rate, self.stats.inc, lie_in_manifest=lie, corrupt=None if corrupt == "all"
                           else frozenset(int(i) for i in corrupt.split(",") if i.strip().isdigit()))
        return self.shelf

    def _start_depot(self, ledger: pykka.ActorRef, gateway: pykka.ActorRef | None, admin: pykka.ActorRef) -> None:
        from .depot.digest import DigestCache
        from .depot.fetcher import DepotActor
        from .depot.store import ModelsDir

        serve = self.s.serve
        gw = gateway.proxy() if gateway is not None else None

        def progress(problem: str) -> None:  # the depot's thread: while this node waits for its model
            if self._fetching and gw is not None:
                gw.engine_failed(problem)  # requests with no other route get a 503 that says so

        def whole(path: str) -> None:  # the depot's thread
            if self._fetching and self.s.serve.model != path:
                serve.model = path
                threading.Thread(target=self._fetched, name="node-fetched", daemon=True).start()

        depot = self._start(DepotActor, self.ctx, self.keys, self._own_keys(), self.identity.node_id,
                            ModelsDir(self._models_root(), serve.models_max),
                            DigestCache(self.state.path / "digests.json"), self.stats, ledger.proxy(),
                            shelf=self.shelf,
                            # only a node whose gateway takes peers' queries shares its file
                            served=None if self._fetching or self.shelf is None else self._model_path,
                            on_whole=whole, on_progress=progress)
        ledger.proxy().add_listener(depot).get(timeout=START_TIMEOUT_S)
        dp = depot.proxy()

        def pull(model: str = "") -> dict:
            """Fetch a model (name or sha256) from peers into the models directory: model=NAME."""
            from .actors.admin import AdminCommandError

            if not model:
                raise AdminCommandError(3, "pull: name the model (pull NAME, or its sha256)")
            try:
                return dp.want(model).get(timeout=START_TIMEOUT_S)
            except ValueError as e:  # another fetch is in hand
                raise AdminCommandError(3, str(e)) from None

        def models() -> list:
            """Every model file in the cluster: where each copy is, and how complete."""
            return dp.models().get(timeout=START_TIMEOUT_S)
        admin.proxy().register("pull", pull)
        admin.proxy().register("models", models)
        admin.proxy().register_status("fetch", lambda: dp.fetch_status().get(timeout=START_TIMEOUT_S))
        if self._fetching:
            dp.want(self._fetching).get(timeout=START_TIMEOUT_S)

    def _fetched(self) -> None:
        """The model this node was started to serve is here now (a helper thread): its engine starts."""
        try:
            self._fetching = ""
            self._gateway.engine_failed("")
            self._start_engine(*self._engine_args)
        except StartCancelled:
            pass
        except Exception:  # noqa: BLE001 (a bug: the node cannot serve, and says why)
            log.exception("cannot start the engine after fetching its model")
            self.fatal.append("cannot start the engine after fetching its model (see the log)")

    def _start_children(self, node_id: str, supervisor: pykka.ActorRef, gateway: pykka.ActorRef,
                        ledger: pykka.ActorRef | None, admin: pykka.ActorRef) -> None:
        s = self.s
        if s.serve is not None:
            self._gateway = gateway.proxy()
            self._engine_args = (node_id, supervisor, gateway, ledger, admin)
            if not self._fetching:
                self._start_engine(*self._engine_args)
        if s.http is not None:
            self._start_http(supervisor, admin)

    def _start_engine(self, node_id: str, supervisor: pykka.ActorRef, gateway: pykka.ActorRef,
                      ledger: pykka.ActorRef | None, admin: pykka.ActorRef) -> None:
        s = self.s
        sup, gw = supervisor.proxy(), gateway.proxy()
        if s.serve is not None:
            engine_endpoint = self.state.endpoint("engine")
            sharder = self._start_sharder(gateway, supervisor, ledger, admin)

            # up, down and failed run in the supervisor's thread: they only tell (a proxy made
            # once, here: making one for an actor that has stopped raises). The Balancer keeps
            # the local route while the engine is down: the gateway parks its requests until the
            # engine is back, or sends them to another node that serves the model.
            ledger_proxy = ledger.proxy() if ledger is not None else None

            def up(model: str) -> None:
                gw.engine_up(engine_endpoint)
                self._engine_model = model
                notify([self.balancer], "engine_up", model=model)
                if ledger_proxy is not None:
                    ledger_proxy.update_own(models=[model])

            def down(why: str) -> None:
                gw.engine_down(f"the engine {why}")
                # A planned restart (a re-shard) keeps the model announced: the gateway holds
                # requests routed here until the engine is back, where withdrawing the model
                # would make every entry point answer 404 for that second.
                if ledger_proxy is not None and why != RESTARTING:
                    ledger_proxy.update_own(models=[])

            def failed(problem: str) -> None:
                gw.engine_failed(problem)  # requests get a 503 with the problem, /readyz says it
                if not problem:  # tried again (restart_child)
                    return
                if ledger_proxy is not None:
                    ledger_proxy.update_own(models=[])

            box = self.plan_box
            argv = lambda: engine_argv(s.serve, engine_endpoint, node_id, box.plan)  # noqa: E731
            sup.start_child(ChildSpec("engine", argv, on_ready=up, on_down=down, report_prefix=ENGINE_REPORTS,
                                      on_report=sharder.proxy().engine_report, on_failed=failed,
                                      on_fatal=self._on_fatal, beats=True)
                            ).get(timeout=START_TIMEOUT_S)

    def _start_http(self, supervisor: pykka.ActorRef, admin: pykka.ActorRef) -> None:
        s, sup = self.s, supervisor.proxy()
        if s.http is not None:
            # the keys go over the admin socket (wsgi.py asks), never in a child's environment
            admin.proxy().set_api_keys(tuple(s.http.api_keys)).get(timeout=START_TIMEOUT_S)
            env = {"ZSWARM_NODE_ENDPOINT": self.state.endpoint("gateway"), "ZSWARM_ADDRESS": s.http.address,
                   "ZSWARM_NODE_NAME": s.name,
                   "ZSWARM_HTTP_WORKERS": str(s.http.workers), "ZSWARM_STATE_DIR": str(self.state.path),
                   "ZSWARM_REQUEST_TIMEOUT_S": str(s.http.request_timeout_s)}
            env["ZSWARM_HTTP_FD"] = str(self.http_sock.fileno())  # gunicorn binds fd://N (startup.py)
            sup.start_child(ChildSpec("http", http_argv(), env, ready_prefix=None,
                                      pass_fds=(self.http_sock.fileno(),))).get(timeout=START_TIMEOUT_S)
            self.http_url = f"http://{s.http.address}"

    def _start_sharder(self, gateway: pykka.ActorRef, supervisor: pykka.ActorRef,
                       ledger: pykka.ActorRef | None, admin: pykka.ActorRef) -> pykka.ActorRef:
        """Worker mode on a server: the Sharder owns the plan the engine is started with."""
        from .actors.sharder import SharderActor
        from .engine.model import default_model_path
        from .footprint import footprint
        from .sharding import Device

        serve = self.s.serve
        _, avail = memory_bytes()
        local = None
        if serve.local_layers:
            local = Device("local", self.s.name, "", min(avail, serve.mem) if serve.mem else avail)

        def open_tunnel(remote: str, curve: str = "") -> TunnelEntry:
            # the worker's own key (its signed record): only that worker can be at the other end
            entry = TunnelEntry(self.ctx, self.keys, remote, self.stats, own=self._own_keys(),
                                server_key=curve.encode() or None)
            entry.start()
            return entry
        try:
            fp = footprint(serve.model or default_model_path(), serve.ctx_size)
        except (OSError, ValueError) as e:  # the engine's load will say what is wrong with the file
            log.warning("cannot estimate the memory the model needs (%s): splitting by memory alone", e)
            fp = None
        sharder = self._start(SharderActor, self.plan_box, gateway.proxy(), supervisor.proxy(),
                              ledger.proxy() if ledger else None, open_tunnel if self.keys else None, local, fp,
                              serve.reshard_settle_s, serve.rpc_servers, self.stats, self.record.id,
                              max_worker_mem=serve.max_worker_mem)
        sharder.proxy().initial_plan().get(timeout=START_TIMEOUT_S)
        if ledger is not None and not serve.rpc_servers:
            ledger.proxy().add_listener(sharder).get(timeout=START_TIMEOUT_S)
            # discovery runs already: workers the ledger learned before we listened get no event
            notify([sharder], "ledger_changed")
        sp = sharder.proxy()

        def reshard() -> str:
            """Re-shard the model over the workers online now."""
            return sp.reshard().get(timeout=START_TIMEOUT_S)
        admin.proxy().register("reshard", reshard)
        admin.proxy().register_status("shard", lambda: sp.status().get(timeout=START_TIMEOUT_S))
        return sharder

    def _start_worker(self, admin: pykka.ActorRef, ledger: pykka.ActorRef | None, total: int, avail: int) -> None:
        """A worker: a llama.cpp RPC server on 127.0.0.1, reachable only through a CURVE tunnel.

        In p2p mode the RPC child listens in a network namespace of its own, out of other local
        users' reach, and the tunnel exit gets its connections through a socket pair
        (:mod:`.engine.isolation`); where the kernel refuses the namespace, it listens on the
        host's 127.0.0.1, and the node says so (log, ``rpc_server_shared_netns``, admin status).
        Static mode (``--listen``) is reachable by design and stays as it was."""
        import socket

        s, w = self.s, self.s.worker
        supervisor = next(a for a in self.actors if a.actor_class is SupervisorActor)
        static = w.listen is not None
        host, port = (w.listen.rsplit(":", 1) if static else ("127.0.0.1", str(free_local_port())))
        mem_total = min(total, w.mem) if w.mem else total
        mem_free = min(avail, w.mem) if w.mem else avail
        tunnel = ""
        broker_fd = None
        if ledger is not None:
            broker = None
            if not static:
                broker, self.rpc_channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                broker_fd = self.rpc_channel.fileno()
            self.tunnel_exit = TunnelExit(self.ctx, self.keys, next_port(s.p2p_listen, 1), ("127.0.0.1", int(port)),
                                          self.stats, broker=broker, own=self._own_keys())
            self.tunnel_exit.start()
            tunnel = f"tcp://{advertise_host(s.p2p_listen, s.advertise)}:{self.tunnel_exit.port}"
            own = ledger.proxy().own().get(timeout=START_TIMEOUT_S)
            ledger.proxy().update_own(endpoints={**own.endpoints, "tunnel": tunnel}, mem_total=mem_total,
                                      mem_free=mem_free).get(timeout=START_TIMEOUT_S)
            # The exit admits no one until told whom this worker serves: the ledger tells it at every
            # change, but a restarted worker may have heard everything before its exit existed.
            self._ledger_changed(ledger.proxy().records().get(timeout=START_TIMEOUT_S)[1:],
                                 {p["id"]: p["state"] for p in ledger.proxy().peers().get(timeout=START_TIMEOUT_S)})

        # "private": a namespace of its own; "shared": the host's, as READY says; "host": static mode
        netns = {"state": "host" if broker_fd is None else "starting"}
        # up and down run in the supervisor's thread: they tell the Ledger, never wait on it (a
        # proxy made now, because making one for an actor already gone raises in the supervisor)
        ledger_proxy = ledger.proxy() if ledger is not None else None

        def up(detail: str) -> None:
            log.info("RPC server ready on %s:%s%s", host, port, f", tunnel {tunnel}" if tunnel else "")
            words = detail.split()
            if broker_fd is not None and len(words) > 2:
                if words[2] == "shared" and netns["state"] != "shared":
                    self.stats.inc("rpc_server_shared_netns")
                    log.warning("the RPC server listens on the host's 127.0.0.1: every local user can reach it "
                                "(this kernel allows no network namespace for it; see the README)")
                netns["state"] = words[2]
            if ledger_proxy is not None:
                ledger_proxy.set_flag("rpc", True)

        def down(why: str) -> None:
            if ledger_proxy is not None:
                ledger_proxy.set_flag("rpc", False)

        argv = rpc_server_argv(host, int(port), w, mem_free, allow_remote=static and not is_loopback(host),
                               broker_fd=broker_fd, cache_dir=self._tensor_cache)
        supervisor.proxy().start_child(ChildSpec("rpc", argv, on_ready=up, on_down=down, on_failed=down,
                                                 on_fatal=self._on_fatal, beats=True,
                                                 pass_fds=() if broker_fd is None else (broker_fd,),
                                                 chatter=RPC_CHATTER)
                                       ).get(timeout=START_TIMEOUT_S)
        from .actors.sharder import holder_status

        own_id = self.record.id  # held_by: the server whose split this worker serves (None: free)
        admin.proxy().register_status("rpc", lambda: {"listen": f"{host}:{port}", "netns": netns["state"],
                                                      "tunnel": tunnel,
                                                      "mem_total": mem_total, "mem_free": mem_free,
                                                      "held_by": holder_status(ledger_proxy, own_id)
                                                      if ledger_proxy is not None else None})

    def _on_fatal(self, line: str) -> None:
        """A child can never start (the supervisor's thread): run() stops the node and exits."""
        self.fatal.append(line)

    def _start(self, cls: type, *args: Any, **kwargs: Any) -> pykka.ActorRef:
        with self._lock:  # stop() either sees this actor or start() sees the node closed
            if self._closed:
                raise StartCancelled(f"the node is stopping; {cls.__name__} not started")
            ref = cls.start(*args, watch=self.watch, **kwargs)
            self.actors.append(ref)
        return ref

    def watch_actors(self) -> None:
        """Main thread, every ``POLL_S``: an actor that stopped without the node asking it to is
        logged and shown in the admin status, then restarted or the node stops (``fatal``)."""
        with self._lock:
            if self._closed:
                return
            dead = [r for r in self.actors if not r.is_alive()]
        found = sorted(((ref, self.watch.why(ref.actor_urn)) for ref in dead), key=lambda f: f[1] is None)
        for ref, why in found:  # those that said why first: the others may have stopped with them
            if self.fatal:
                return  # the node stops already
            if why is None and ref.actor_urn not in self._dead_seen:
                self._dead_seen.add(ref.actor_urn)  # its on_failure may be saying why just now
                continue
            self._dead_seen.discard(ref.actor_urn)
            with self._lock:
                if self._closed:
                    return
                self.actors.remove(ref)
            self._after_death(ref.actor_class, why or "it stopped without saying why (see the log above)")

    def _after_death(self, cls: type, why: str) -> None:
        name = getattr(cls, "name", cls.__name__)
        now = time.monotonic()
        restart = None if self._starting else self._restarts.get(cls)
        recent = [t for t in self._restarted.get(name, []) if now - t < RESTART_WINDOW_S]
        if restart is not None and len(recent) < RESTARTS_MAX:
            log.error("the %s actor failed (%s); starting a new one", name, why)
            self.watch.failed(name, why, "restarted")
            self.stats.inc(f"actor_restarts_{name}")
            self._restarted[name] = recent + [now]
            try:
                restart()
                return
            except Exception as e:  # the actors it needs are gone too (the node is stopping)
                why = f"{why}; a new one did not start: {type(e).__name__}: {e}"
        elif restart is not None:
            why = f"{why}; it failed {len(recent) + 1} times within {RESTART_WINDOW_S:.0f} s"
        log.error("the %s actor failed (%s); the node cannot go on without it and stops", name, why)
        self.watch.failed(name, why, "stopped the node")
        self.fatal.append(f"the {name} actor failed: {why}")

    def stop(self, budget_s: float = STOP_BUDGET_S) -> bool:
        """Stop everything within ``budget_s`` (main thread), however far :meth:`start` got.

        Every actor but the Ledger is asked to stop at once, newest first, so the slowest sets
        the pace instead of the sum; children still alive after ``CHILDREN_STOP_S`` get SIGKILL.
        The Ledger goes last so that its Leave follows everything else. Returns False when
        something could not be stopped (an actor or a thread still running, start() still
        stuck): the caller must then leave with ``os._exit``, not wait for it.
        """
        t0 = time.monotonic()
        deadline = t0 + budget_s
        with self._lock:
            self._closed = True
            actors, self.actors = list(self.actors), []
        ledgers = [r for r in actors if r.actor_class is LedgerActor]
        stuck = _stop_actors([r for r in reversed(actors) if r not in ledgers], t0 + CHILDREN_STOP_S)
        if _kill_children("still running after the supervisor had %.1f s to stop it" % CHILDREN_STOP_S):
            stuck = _stop_actors(stuck, t0 + CHILDREN_STOP_S + 0.2)  # it was waiting on those children
        stuck += _stop_actors(ledgers, deadline - 0.1)
        left = lambda: max(0.05, deadline - time.monotonic())  # noqa: E731
        if self.tunnel_exit is not None and not self.tunnel_exit.stop(timeout_s=left()):
            stuck.append("the tunnel exit")
        if self.rpc_channel is not None:  # after the children: no RPC child needs it any more
            self.rpc_channel.close()
        if self.zap is not None and not self.zap.stop(timeout_s=left()):
            stuck.append("the ZAP handler")
        if self.http_sock is not None:  # after the children: gunicorn no longer needs it
            self.http_sock.close()
        _kill_children("still running after stop")  # a supervisor stuck in a call never reached on_stop
        for what in stuck:
            log.error("%s did not stop within %.1f s; the node exits without it", what, budget_s)
        for ref in pykka.ActorRegistry.get_all():
            if ref not in stuck:
                log.error("bug: actor %s still running after stop", ref)
                stuck.append(ref)
        threads = [t for t in threading.enumerate()
                   if t is not threading.current_thread() and t.is_alive() and not t.daemon]
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))  # an actor's thread ends just after its stop answers
        # socket threads are daemons: one still polling would see its sockets closed under it
        leftovers = [t.name for t in threads if t.is_alive()] + [
            t.name for t in threading.enumerate() if isinstance(t, SocketLoop) and t.is_alive()]
        if leftovers:
            log.error("bug: threads still running after stop: %s", ", ".join(leftovers))
        if self._starting:
            log.warning("start-up was still waiting when the node stopped")
        if stuck or leftovers or self._starting:
            return False  # ctx.destroy() would wait for sockets that a stuck thread still holds
        self.ctx.destroy(linger=0)  # the Ledger's closed sockets keep their short linger for the Leave
        return True


def _stop_actors(refs: list[pykka.ActorRef], deadline: float) -> list[pykka.ActorRef]:
    """Ask every actor in ``refs`` to stop, at once; wait until ``deadline``; return those still running."""
    pending = [(ref, ref.stop(block=False)) for ref in refs]
    stuck = []
    for ref, fut in pending:
        try:
            fut.get(timeout=max(0.0, deadline - time.monotonic()))
        except pykka.Timeout:
            stuck.append(ref)
    return stuck


def _child_pids() -> list[int]:
    """This process's live children, from /proc (Linux; elsewhere none are found)."""
    me, found = os.getpid(), []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        state, ppid = stat[stat.rindex(b")") + 2:].split()[:2]
        if int(ppid) == me and state not in (b"Z", b"X"):
            found.append(int(name))
    return found


def _kill_children(why: str) -> bool:
    """SIGKILL every child of this process, with its process group (the supervisor starts each in
    a session of its own, so gunicorn's workers go too). The last resort of a bounded stop: the
    supervisor owns its children, and this only runs once it had its chance. True if any was found."""
    pids = _child_pids()
    for pid in pids:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:  # not a group leader: never kill a group that may hold this node itself
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        log.warning("child process %d %s; killed", pid, why)
    return bool(pids)


def next_port(listen: str, offset: int) -> str:
    """The address for the node's next socket: the p2p port plus ``offset`` (port 0 stays 0)."""
    host, port = listen.rsplit(":", 1)
    return f"{host}:{int(port) + offset if int(port) else 0}"


def free_local_port() -> int:
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def engine_argv(serve: ServeSettings, endpoint: str, node_id: str, plan: Any = None) -> list[str] | None:
    """The engine's command line for ``plan`` (a :class:`~zswarm.sharding.Plan`; None: no plan
    can hold the model yet, so nothing starts)."""
    if plan is None:
        return None
    argv = [sys.executable, "-m", "zswarm.engine.proc", "--endpoint", endpoint, "--node-id", node_id,
            "--ctx-size", str(serve.ctx_size), "--parallel", str(serve.parallel),
            "--max-queue", str(serve.max_queue), "--prompt-cache", str(serve.prompt_cache)]
    if serve.model:
        argv += ["--model", serve.model]
    if serve.threads:
        argv += ["--threads", str(serve.threads)]
    if plan.remote:
        argv += ["--rpc-servers", ",".join(d.endpoint for d in plan.remote),
                 "--tensor-split", ",".join(f"{w:.6f}" for w in plan.weights)]
        if not plan.has_local:
            argv.append("--no-local-layers")
    return argv


def rpc_server_argv(host: str, port: int, w: WorkerSettings, mem: int, allow_remote: bool,
                    broker_fd: int | None = None, cache_dir: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "zswarm.engine.rpc_server", "--host", host, "--port", str(port),
            "--mem", str(mem)]
    if broker_fd is not None:  # a p2p worker: a network namespace of its own, connections through the fd
        argv += ["--broker-fd", str(broker_fd)]
    if w.threads:
        argv += ["--threads", str(w.threads)]
    if cache_dir:
        argv += ["--cache-dir", cache_dir]
    if allow_remote:
        argv.append("--allow-remote")
    return argv


def http_argv() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", "python:zswarm.http.gunicorn_conf",
            "zswarm.http.wsgi:app_factory()"]


def run(settings: NodeSettings, ready_line: str | None = None) -> int:
    """Run a node until SIGTERM/SIGINT. Returns the process exit status.

    Start-up runs in a helper thread: it waits on actors (up to ``START_TIMEOUT_S`` each), and a
    signal must be acted on at once, not after those waits. The main thread only watches the
    signals and the helper, and stops the node whichever comes first.
    """
    stopping: list[int] = []  # a plain list, not an Event: a handler must take no lock (a second
    # signal arriving inside Event.set() in the first handler would deadlock the main thread)

    def _on_signal(signum: int, frame: Any) -> None:
        if not stopping:
            stopping.append(signum)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGUSR1, pykka.debug.log_thread_tracebacks)
    try:
        node = Node(settings)
    except StateDirError as e:
        print(f"zswarm: error: {e}", file=sys.stderr)
        return 1
    status, line = 1, None
    try:
        status, line = _serve(node, settings, ready_line, stopping)
    finally:  # also after a bug's exception, which Python prints once this has run
        clean = node.stop()
        if line:  # after the stop's log lines: the last line on stderr says why the node ended
            print(f"zswarm: error: {line}", file=sys.stderr, flush=True)
        if not clean:
            # A thread still running (an actor stuck in a call) would keep the interpreter from
            # exiting; the log says what it was.
            if sys.exc_info()[1] is not None:
                traceback.print_exc()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    return status


class _Starter(threading.Thread):
    """Runs :meth:`Node.start`; a daemon, so that a start-up stuck in a call never holds the process."""

    def __init__(self, node: Node):
        super().__init__(name="node-start", daemon=True)
        self._node = node
        self.record: wire.NodeRecord | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.record = self._node.start()
        except BaseException as e:  # handed to the main thread
            self.error = e


def _serve(node: Node, settings: NodeSettings, ready_line: str | None,
           stopping: list[int]) -> tuple[int, str | None]:
    """Start and run the node; (exit status, the error line to print once it has stopped)."""
    starter = _Starter(node)
    if not stopping:
        starter.start()
        while starter.is_alive() and not stopping and not node.fatal:
            starter.join(POLL_S)
            node.watch_actors()
    if stopping:
        log.info("received %s%s; stopping", signal.Signals(stopping[0]).name,
                 " while starting" if starter.is_alive() else "")
        return 0, None
    if node.fatal:
        return 1, node.fatal[0]
    if starter.error is not None:
        line = _start_error(starter.error)
        if line is None:
            raise starter.error  # a bug: its traceback names the start-up step
        return getattr(starter.error, "status", 1), line
    record = starter.record
    log.info("node %s (%s) up: %s, admin %s%s", record.id, settings.role,
             f"gossip {record.endpoints['gossip']}, network {node.keys.network_id}" if node.keys else "no cluster",
             node.state.admin_socket, f", API at {node.http_url}" if node.http_url else "")
    if ready_line:
        gossip = record.endpoints["gossip"]
        print(ready_line.format(id=record.id, gossip=gossip, gossip_hostport=gossip[len("tcp://"):]),
              flush=True)
    while not stopping and not node.fatal:
        time.sleep(POLL_S)
        node.watch_actors()
    if node.fatal:  # a child can never start, an actor died: the node cannot do its job, and says so by exiting
        return 1, node.fatal[0]
    log.info("received %s; stopping", signal.Signals(stopping[0]).name)
    return 0, None


def _start_error(e: BaseException) -> str | None:
    """The one line that says why start-up failed; None for a bug (the caller re-raises it)."""
    if isinstance(e, (BindError, StartError)):
        return str(e)
    if isinstance(e, zmq.ZMQError):
        return f"cannot open the node's sockets: {e}"
    if isinstance(e, (pykka.Timeout, TimeoutError)):
        # Which step waited, and what every thread was doing then: the log keeps the detail.
        step = _start_step(e)
        log.error("start-up timed out%s; every thread's stack follows", f" at {step}" if step else "")
        pykka.debug.log_thread_tracebacks()
        if isinstance(e, pykka.Timeout):
            return "the node did not start in time" + (
                f" (no answer to {step} within {START_TIMEOUT_S:g} s)" if step else "")
        return f"the node did not start in time ({e})"
    if isinstance(e, pykka.ActorDeadError):
        return f"the node did not start: an actor stopped while starting (see the log above): {e}"
    return None


def _start_step(e: BaseException) -> str:
    """The start-up line (of this module) that was waiting when ``e`` was raised."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == __file__]
    if not frames:
        return ""
    line = (frames[-1].line or "").split(".get(")[0].strip()
    target, sep, value = line.partition(" = ")
    if sep and target.replace("_", "").replace(".", "").isalnum():
        line = value  # the call, not what its answer is assigned to
    return f"{frames[-1].name}: {line[:120]}"
