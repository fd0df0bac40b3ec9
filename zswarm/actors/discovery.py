"""Discovery actor: tells the Ledger whom to dial.

Sources: bootstrap endpoints (flags, environment, the token), and mDNS (``_zswarm._tcp.local.``).
Peer exchange needs nothing here: the Ledger dials every node its records name.

mDNS announcements carry the network id and an HMAC (token-derived key) over what they claim:
addresses, port, a time and a nonce (``zswarm/announcement.py`` says what is checked and why).
Anything else on the LAN, another zswarm cluster, a stale, replayed or re-addressed announcement
included, is ignored and counted (``mdns_ignored`` and ``mdns_ignored_<reason>``). Zeroconf calls
back on its own event-loop thread, where nothing may block, and resolving a service blocks; so
resolving, registering and re-signing (every ``announcement.REFRESH_S``) happen on one helper
thread fed by a bounded queue (``MDNS_QUEUE_MAX``; what does not fit is dropped and counted as
``mdns_queue_dropped``: a flood of service names must not grow memory), which tells the actor.

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

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from .. import announcement
from ..token import Keys
from ..transport import Stats
from .base import GuardedActor, Watch
from .listener import tell

log = logging.getLogger(__name__)

SERVICE_TYPE = "_zswarm._tcp.local."
RESOLVE_TIMEOUT_MS = 3000  # zeroconf's default; a peer on the LAN answers in milliseconds
MDNS_STOP_WAIT_S = 0.3  # on_stop waits this long for the helper thread, no more (see above)
MDNS_QUEUE_MAX = 256  # service names waiting to be resolved; a LAN cluster has a few, so more is a flood


@dataclass
class _Found:
    node_id: str
    endpoint: str
    signed_ms: int = 0  # when the announcement was signed (Unix ms)


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
        self._signed_ms: dict[str, int] = {}  # node id -> its latest announcement's time (Unix ms)

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
        if isinstance(message, _Found) and message.signed_ms:
            self._signed_ms[message.node_id] = message.signed_ms
        if isinstance(message, _Found) and self._found.get(message.node_id) != message.endpoint:
            log.info("mDNS: found node %s at %s", message.node_id, message.endpoint)
            old = self._found.get(message.node_id)
            if old:
                self._ledger.undial(old, "mdns")
            self._found[message.node_id] = message.endpoint
            self._ledger.dial(message.endpoint, "mdns")

    def set_keys(self, keys: Keys) -> None:
        """The cluster moved to a new token (rotation.py): announce and listen with its keys."""
        self._keys = keys

    def status(self) -> dict:
        return {"bootstrap": list(self._bootstrap), "mdns": self._mdns,
                "mdns_interfaces": list(self._interfaces), "mdns_found": dict(self._found),
                "mdns_signed_ms": dict(self._signed_ms)}


class _MdnsWorker(threading.Thread):
    """Owns the Zeroconf instance; registers us (re-signed every ``REFRESH_S``), resolves and
    judges what the browser sees."""

    def __init__(self, actor: DiscoveryActor):
        super().__init__(name="mdns", daemon=True)
        self._a = actor
        self._ref = actor.actor_ref
        self._stats = actor._stats
        self._q: queue.Queue[str | None] = queue.Queue(MDNS_QUEUE_MAX)
        self._queued: set[str] = set()  # names in _q: a busy service holds one place, not one per update
        self._queued_lock = threading.Lock()  # _queued: zeroconf's loop thread adds, this thread removes
        self._stopping = threading.Event()
        self._guard = announcement.ReplayGuard()
        self._signed_ms = 0  # our latest announcement's time: each one is later (receivers refuse older)
        self._logged: set[str] = set()  # ignore reasons already logged at info; later ones at debug

    def stop(self, timeout_s: float) -> bool:
        """Ask the thread to stop (any thread); False if it was still busy after ``timeout_s``."""
        self._stopping.set()
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass  # then the thread is not waiting: it takes an item at once and sees _stopping
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
            every = a._interfaces or _ipv4_addresses()
            addrs = announcement.fit_addresses(every)
            if len(addrs) < len(set(every)):
                log.warning("mDNS: announcing %s only: one TXT string holds no more addresses (--mdns-interface "
                            "chooses)", ", ".join(addrs))
            info = self._info(ServiceInfo, addrs)
            if self._stopping.is_set():
                return
            zc.register_service(info)
            browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_change])
            refresh_at = time.monotonic() + announcement.REFRESH_S
            while not self._stopping.is_set():
                wait_s = refresh_at - time.monotonic()
                if wait_s <= 0:  # checked between resolves too: a flood must not let us go stale
                    info = self._refresh(zc, ServiceInfo, addrs, info)
                    refresh_at = time.monotonic() + announcement.REFRESH_S
                    continue
                try:
                    name = self._q.get(timeout=wait_s)
                except queue.Empty:
                    continue
                if name is None or self._stopping.is_set():
                    break
                with self._queued_lock:
                    self._queued.discard(name)  # before resolving: an update meanwhile queues it again
                self._resolve(zc, name)
        except Exception:
            if not self._stopping.is_set():
                log.exception("mDNS stopped")
        finally:
            self._close(zc, browser, info)

    def _info(self, ServiceInfo: Any, addrs: list[str]) -> Any:
        """Our announcement, freshly signed: the A records carry exactly the signed addresses."""
        a = self._a
        self._signed_ms = max(int(time.time() * 1000), self._signed_ms + 1)
        props = announcement.properties(a._keys, a._node_id, a._role, a._port, addrs, self._signed_ms,
                                        secrets.token_hex(8))
        name = f"{a._node_id}.{SERVICE_TYPE}"  # the host name too (update_service needs it given)
        return ServiceInfo(SERVICE_TYPE, name, server=name, parsed_addresses=addrs, port=a._port, properties=props)

    def _refresh(self, zc: Any, ServiceInfo: Any, addrs: list[str], info: Any) -> Any:
        """Re-sign and re-announce (new time and nonce) so that receivers never find us stale."""
        new = self._info(ServiceInfo, addrs)
        try:
            zc.update_service(new)
        except Exception as e:  # EventLoopBlocked on a loaded host; the next refresh tries again
            self._stats.inc("mdns_refresh_failed")
            log.warning("mDNS: re-announcing failed (%r); trying again in %.0f s", e, announcement.REFRESH_S)
        return new

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
        """Zeroconf's event-loop thread: queue the name, never block."""
        if state_change.name not in ("Added", "Updated"):
            return
        with self._queued_lock:
            if name in self._queued:
                return
            try:
                self._q.put_nowait(name)
            except queue.Full:
                self._stats.inc("mdns_queue_dropped")
                if "queue" not in self._logged:
                    self._logged.add("queue")
                    log.warning("mDNS: more than %d services waiting to be resolved; dropping (counted as "
                                "mdns_queue_dropped)", MDNS_QUEUE_MAX)
                return
            self._queued.add(name)

    def _resolve(self, zc: Any, name: str) -> None:
        info = zc.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_TIMEOUT_MS)
        if info is None:
            return
        a = self._a
        now_s = time.time()
        v = announcement.verify(a._keys, info.properties or {}, info.port or 0, info.parsed_addresses(), now_s)
        if isinstance(v, announcement.Announcement) and v.node_id == a._node_id:
            return  # our own, heard back
        if isinstance(v, announcement.Announcement):
            seen = self._guard.check(v, now_s)
            if seen == announcement.REPLAYED:
                v = announcement.Ignored(announcement.REPLAYED, v.node_id, f"signed at {v.t_ms} ms, "
                                         "not the latest seen from that node")
            elif seen == "repeat":
                return  # zeroconf's re-announcements and caches: already told
        if isinstance(v, announcement.Ignored):
            self._ignore(name, v)
            return
        if v.unsigned:  # the records mix in addresses the node never signed: they are not dialled
            self._stats.inc("mdns_unsigned_addresses")
            self._log_once("unsigned", "mDNS: %r resolved also to unsigned addresses %s (not dialled)", name,
                           ", ".join(v.unsigned))
        host = f"[{v.dial[0]}]" if ":" in v.dial[0] else v.dial[0]
        tell(self._ref, _Found(v.node_id, f"tcp://{host}:{v.port}", v.t_ms))

    def _ignore(self, name: str, why: announcement.Ignored) -> None:
        self._stats.inc("mdns_ignored")
        self._stats.inc(f"mdns_ignored_{why.reason}")
        self._log_once(why.reason, "mDNS: ignored %r (%s%s%s); counted as mdns_ignored_%s", name, why.reason,
                       f", node {why.node_id!r}" if why.node_id else "", f": {why.detail}" if why.detail else "",
                       why.reason)

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        """Info the first time, debug after: what a stranger sends must not flood the log."""
        log.log(logging.DEBUG if key in self._logged else logging.INFO, msg, *args)
        self._logged.add(key)


def _ipv4_addresses() -> list[str]:
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                out.append(ip.ip)
    return out or ["127.0.0.1"]
