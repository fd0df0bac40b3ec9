"""The one place that starts a node: actors in dependency order, stopped in reverse.

A node is a process holding pykka actors: Ledger (gossip), Discovery, Admin; the Gateway,
Balancer and RPCSupervisor join the same sequence. Start-up asks each actor to ``open()`` (bind)
with a timeout, so a port in use is one clear error line, not a traceback. SIGTERM and SIGINT
stop the node gracefully (the Ledger announces the leave); SIGUSR1 logs every thread's stack.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pykka
import pykka.debug
import zmq

from . import __version__, wire
from .actors.admin import AdminActor
from .actors.discovery import DiscoveryActor
from .actors.ledger import BindError, LedgerActor
from .membership import Timing
from .state import StateDir
from .token import Token
from .transport import Stats, ZapHandler

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


@dataclass
class NodeSettings:
    role: str  # "server", "federated" or "worker"
    token: Token
    state_dir: str
    p2p_listen: str
    advertise: str | None = None
    bootstrap: list[str] = field(default_factory=list)
    mdns: bool = True
    mdns_interfaces: list[str] = field(default_factory=list)
    local_only: bool = False
    name: str = "node"
    flags: list[str] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)


def advertise_host(listen: str, advertise: str | None) -> str:
    if advertise:
        host = advertise.rsplit(":", 1)[0] if advertise.count(":") == 1 else advertise
        return host
    host = listen.rsplit(":", 1)[0]
    if host not in ("0.0.0.0", "*", ""):
        return host
    from .actors.discovery import _ipv4_addresses

    return _ipv4_addresses()[0]


def memory_bytes() -> tuple[int, int]:
    """(total, available) physical memory, from /proc/meminfo where there is one."""
    total = avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key == "MemTotal":
                    total = int(value.split()[0]) * 1024
                elif key == "MemAvailable":
                    avail = int(value.split()[0]) * 1024
    except OSError:
        pass
    return total, avail


class Node:
    """Holds the running actors; :meth:`start` and :meth:`stop` are called from the main thread."""

    def __init__(self, settings: NodeSettings):
        self.s = settings
        self.stats = Stats()
        self.state = StateDir(settings.state_dir).ensure()
        self.keys = settings.token.derive()
        self.ctx = zmq.Context()
        self.zap = ZapHandler(self.ctx, self.keys, self.stats)
        self.actors: list[pykka.ActorRef] = []
        self.record: wire.NodeRecord | None = None

    def start(self) -> wire.NodeRecord:
        s = self.s
        node_id = self.state.node_id()
        total, avail = memory_bytes()
        own = wire.NodeRecord(
            id=node_id, name=s.name, role=s.role, incarnation=time.time_ns() // 1000,
            software=__version__, started_at=time.time(), mem_total=total, mem_free=avail,
            flags=list(s.flags))
        # ZAP first: a CURVE socket bound before a handler runs would let anyone in.
        self.zap.start()
        ledger = self._start(LedgerActor, self.ctx, self.keys, own, s.p2p_listen,
                             advertise_host(s.p2p_listen, s.advertise), self.stats, s.timing)
        self.record = ledger.proxy().open().get(timeout=START_TIMEOUT_S)
        port = int(self.record.endpoints["gossip"].rsplit(":", 1)[1])
        bootstrap = [] if s.local_only else list(dict.fromkeys(list(s.token.bootstrap) + s.bootstrap))
        discovery = self._start(DiscoveryActor, ledger.proxy(), self.keys, node_id, s.role, bootstrap,
                                s.mdns, s.mdns_interfaces, port, self.stats)
        facts = {"id": node_id, "role": s.role, "network_id": self.keys.network_id,
                 "state_dir": str(self.state.path), "flags": list(s.flags)}
        admin = self._start(AdminActor, self.ctx, self.state.admin_endpoint, str(self.state.admin_socket),
                            facts, ledger.proxy(), discovery.proxy(), self.stats)
        admin.proxy().open().get(timeout=START_TIMEOUT_S)
        discovery.proxy().status().get(timeout=START_TIMEOUT_S)  # answers once on_start has run
        return self.record

    def _start(self, cls: type, *args: Any) -> pykka.ActorRef:
        ref = cls.start(*args)
        self.actors.append(ref)
        return ref

    def stop(self) -> None:
        for ref in reversed(self.actors):
            try:
                ref.stop(timeout=STOP_TIMEOUT_S)
            except pykka.Timeout:
                log.error("actor %s did not stop within %s s", ref, STOP_TIMEOUT_S)
        self.actors.clear()
        self.zap.stop()
        self.ctx.destroy(linger=0)
        leftovers = [t.name for t in threading.enumerate()
                     if t is not threading.main_thread() and t.is_alive() and not t.daemon]
        for ref in pykka.ActorRegistry.get_all():
            log.error("bug: actor %s still running after stop", ref)
        if leftovers:
            log.error("bug: threads still running after stop: %s", ", ".join(leftovers))


def run(settings: NodeSettings, ready_line: str | None = None) -> int:
    """Run a node until SIGTERM/SIGINT. Returns the process exit status."""
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGUSR1, pykka.debug.log_thread_tracebacks)
    node = Node(settings)
    try:
        try:
            record = node.start()
        except BindError as e:
            print(f"zswarm: error: {e}", file=sys.stderr)
            return 1
        except pykka.Timeout:
            print("zswarm: error: the node did not start in time", file=sys.stderr)
            return 1
        log.info("node %s (%s) up: gossip %s, network %s, admin %s", record.id, settings.role,
                 record.endpoints["gossip"], node.keys.network_id, node.state.admin_socket)
        if ready_line:
            gossip = record.endpoints["gossip"]
            print(ready_line.format(id=record.id, gossip=gossip, gossip_hostport=gossip[len("tcp://"):]),
                  flush=True)
        while not stop.wait(1.0):
            pass
        return 0
    finally:
        node.stop()
