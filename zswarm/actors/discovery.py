"""Discovery actor: tells the Ledger whom to dial.

Sources: bootstrap endpoints (flags, environment, the token), and mDNS (``_zswarm._tcp.local.``).
Peer exchange needs nothing here: the Ledger dials every node its records name.

mDNS announcements carry the network id and an HMAC (token-derived key) over what they claim;
anything else on the LAN, another zswarm cluster included, is ignored and counted. Zeroconf calls
back on its own event-loop thread, where nothing may block, and resolving a service blocks; so
resolving and registering happen on one helper thread fed by a queue, which tells the actor.

Stopping never waits for zeroconf: registering takes about 2 s (probes, then announcements),
withdrawing 3 x 125 ms, a resolve up to ``RESOLVE_TIMEOUT_MS``, and a node must be gone within 2 s
of SIGTERM. ``on_stop`` tells the helper thread to stop and waits ``MDNS_STOP_WAIT_S`` at most;
the thread (a daemon) skips what is queued, says goodbye if it still can, and closes zeroconf.

When it dies the node stops (``node.py``): a new Discovery in the same process would announce
the node's mDNS name while the old announcement may still be withdrawing, and the Admin's view
of it would need re-wiring; a fresh process (systemd restarts the node) does both from a clean
state, and peers already known stay reachable meanwhile through the Ledger.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Any

from ..token import Keys
from ..transport import Stats
from .base import GuardedActor, Watch
from .listener import tell

log = logging.getLogger(__name__)

SERVICE_TYPE = "_zswarm._tcp.local."
RESOLVE_TIMEOUT_MS = 3000  # zeroconf's default; a peer on the LAN answers in milliseconds
MDNS_STOP_WAIT_S = 0.3  # on_stop waits this long for the helper thread, no more (see above)


def sign(keys: Keys, node_id: str, port: int) -> str:
    msg = f"{keys.network_id}|{node_id}|{port}".encode()
    return hmac.new(keys.discovery_key, msg, hashlib.sha256).hexdigest()[:32]


@dataclass
class _Found:
    node_id: str
    endpoint: str


class DiscoveryActor(GuardedActor):
    name = "discovery"

    def __init__(self, ledger: Any, keys: Keys, node_id: str, role: str, bootstrap: list[str],
                 mdns: bool, mdns_interfaces: list[str], gossip_port: int, stats: Stats,
                 watch: Watch | None = None):
        super().__init__(watch)
        self._ledger = ledger
        self._keys = keys
        self._node_id = node_id
        self._role = role
        self._bootstrap = bootstrap
        self._mdns = mdns
        self._interfaces = mdns_interfaces
        self._port = gossip_port
        self._stats = stats
        self._worker: _MdnsWorker | None = None
        self._found: dict[str, str] = {}

    def on_start(self) -> None:
        """Actor thread: dial the bootstrap peers, then start the mDNS thread (last: an exception
        before it leaves no thread behind)."""
        for endpoint in self._bootstrap:
            self._ledger.dial(endpoint, "bootstrap")
        if self._mdns:
            self._worker = _MdnsWorker(self)
            self._worker.start()

    def release(self) -> None:
        if self._worker is not None and not self._worker.stop(MDNS_STOP_WAIT_S):
            log.debug("mDNS thread still busy in zeroconf at stop; leaving it to finish on its own")

    def handle(self, message: Any) -> None:
        if isinstance(message, _Found) and self._found.get(message.node_id) != message.endpoint:
            log.info("mDNS: found node %s at %s", message.node_id, message.endpoint)
            old = self._found.get(message.node_id)
            if old:
                self._ledger.undial(old, "mdns")
            self._found[message.node_id] = message.endpoint
            self._ledger.dial(message.endpoint, "mdns")

    def status(self) -> dict:
        return {"bootstrap": list(self._bootstrap), "mdns": self._mdns,
                "mdns_interfaces": list(self._interfaces), "mdns_found": dict(self._found)}


class _MdnsWorker(threading.Thread):
    """Owns the Zeroconf instance; registers us, resolves what the browser sees."""

    def __init__(self, actor: DiscoveryActor):
        super().__init__(name="mdns", daemon=True)
        self._a = actor
        self._ref = actor.actor_ref
        self._q: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()

    def stop(self, timeout_s: float) -> bool:
        """Ask the thread to stop (any thread); False if it was still busy after ``timeout_s``."""
        self._stopping.set()
        self._q.put(None)
        self.join(timeout_s)
        return not self.is_alive()

    def run(self) -> None:
        from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, Zeroconf

        a = self._a
        if self._stopping.is_set():
            return
        try:
            zc = Zeroconf(interfaces=a._interfaces or InterfaceChoice.All, ip_version=IPVersion.V4Only)
        except OSError as e:
            log.error("mDNS disabled: %s", e)
            return
        info = browser = None
        try:
            addrs = a._interfaces or _ipv4_addresses()
            info = ServiceInfo(
                SERVICE_TYPE, f"{a._node_id}.{SERVICE_TYPE}",
                addresses=[socket.inet_aton(x) for x in addrs], port=a._port,
                properties={"net": a._keys.network_id, "id": a._node_id, "role": a._role,
                            "sig": sign(a._keys, a._node_id, a._port)})
            if self._stopping.is_set():
                return
            zc.register_service(info)
            browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_change])
            while (name := self._q.get()) is not None and not self._stopping.is_set():
                self._resolve(zc, ServiceInfo, name)
        except Exception:
            if not self._stopping.is_set():
                log.exception("mDNS stopped")
        finally:
            self._close(zc, browser, info)

    @staticmethod
    def _close(zc: Any, browser: Any, info: Any) -> None:
        """Goodbye (the service's records with TTL 0) and close; best effort, the node is leaving."""
        try:
            if browser is not None:
                browser.cancel()
            if info is not None and browser is not None:
                zc.unregister_service(info)
        except Exception as e:  # EventLoopBlocked on a loaded host: peers' caches expire us instead
            log.debug("mDNS goodbye failed: %r", e)
        finally:
            zc.close()

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change.name in ("Added", "Updated"):
            self._q.put(name)

    def _resolve(self, zc: Any, ServiceInfo: Any, name: str) -> None:
        info = zc.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_TIMEOUT_MS)
        if info is None:
            return
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
        node_id = props.get("id", "")
        keys = self._a._keys
        if props.get("net") != keys.network_id or not hmac.compare_digest(
                props.get("sig", ""), sign(keys, node_id, info.port or 0)):
            self._a._stats.inc("mdns_ignored")
            return
        if node_id == self._a._node_id:
            return
        addrs = info.parsed_addresses()
        if addrs:
            tell(self._ref, _Found(node_id, f"tcp://{addrs[0]}:{info.port}"))


def _ipv4_addresses() -> list[str]:
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                out.append(ip.ip)
    return out or ["127.0.0.1"]
