"""Throw-away multi-host network labs built from Linux network namespaces.

Tests use this module to run several "hosts" on one machine without sending
anything outside it. A ``NetnsLab`` owns everything it creates, and nothing
else:

* one namespace ``<prefix>-<pid>-<rand>-br`` holding the bridge ``br0``
  (multicast snooping off, so mDNS and other multicast floods to every port);
* one namespace ``<prefix>-<pid>-<rand>-h<i>`` per host, with ``lo`` up and a
  veth ``eth0`` whose peer ``h<i>`` is a port of ``br0``. Host ``i`` has
  ``10.213.X.(10+i)/24`` (``X`` is random per lab) and a route for
  ``224.0.0.0/4`` on ``eth0`` (zeroconf sets IP_MULTICAST_IF and works without
  it; it is there for multicast senders that do not pick an interface);
* the processes started with ``Host.popen``;
* nftables tables it adds (``cut``/``mend`` a host's link, make it ``lossy``), which go with
  their namespaces.

Both ends of every veth are created directly inside lab namespaces, so the root
namespace's interfaces, addresses and routes are never touched, and interface
names cannot clash between labs. IPv6 is disabled inside lab namespaces unless
``ipv6=True`` (no link-local DAD, router solicitations or MLD noise).

Teardown (``close()``, ``__exit__``, or a ``weakref.finalize`` safety net that
also runs at interpreter exit) kills every process left inside the lab
namespaces and deletes the namespaces; deleting a namespace destroys its
interfaces. It runs even when construction failed half way. Labs left behind by
a process that died without cleaning up (SIGKILL) are swept the next time a lab
with the same prefix is created: their names carry the owner's pid.

Needs root, iproute2 and sysctl. Tests call ``netns_available()`` and skip with the
reason it returns; faults need ``nft`` too (``nft_available()``). The kernel here has no netem:
loss is an nftables ``numgen`` rule on the host's bridge port, and delay is a user-space proxy
(``tests/delayproxy.py``).
"""

from __future__ import annotations

import functools
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import time
import warnings
import weakref
from dataclasses import dataclass, field

__all__ = ["Host", "NetnsLab", "netns_available", "nft_available"]

DEFAULT_PREFIX = "zs"
_SETUP_TIMEOUT = 10.0  # seconds to wait for links to come up
_KILL_TIMEOUT = 5.0  # seconds to wait for processes after SIGTERM, then SIGKILL


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _list_netns() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _alive(names: list[str], procs: list[subprocess.Popen]) -> set[int]:
    pids = {p.pid for p in procs if p.poll() is None}  # poll() also reaps our children
    for name in names:
        pids.update(_netns_pids(name))
    pids.discard(os.getpid())
    return pids


def _delete_netns(names: list[str], procs: list[subprocess.Popen]) -> list[str]:
    """Stop ``procs`` and every process inside ``names``, then delete the namespaces.

    Best effort; returns a list of problems (empty when everything went).
    """
    errors: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _alive(names, procs)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + _KILL_TIMEOUT
        while pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = _alive(names, procs)
        if not pids:
            break
    else:
        errors.append(f"processes still alive: {sorted(pids)}")
    for name in reversed(names):
        proc = _ip("netns", "delete", name, check=False)
        if proc.returncode != 0 and name in _list_netns():
            errors.append(f"ip netns delete {name}: {proc.stderr.strip()}")
    names.clear()
    return errors


def _sweep_stale(prefix: str) -> None:
    """Delete namespaces named by this module for ``prefix`` whose owner pid is gone."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-[0-9a-f]{{6}}-(br|h\d+)$")
    stale = []
    for name in _list_netns():
        m = pattern.match(name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            stale.append(name)
        except PermissionError:
            pass  # owner alive
    if stale:
        _delete_netns(stale, [])


@functools.lru_cache(maxsize=None)
def netns_available() -> str | None:
    """Return None if network namespace labs work here, else why not (for pytest.skip)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespace lab needs root"
    if shutil.which("ip") is None:
        return "network namespace lab needs iproute2 ('ip' not found)"
    if shutil.which("sysctl") is None:
        return "network namespace lab needs procps ('sysctl' not found)"
    try:
        with NetnsLab(1, prefix="zsprobe"):
            pass
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return f"cannot create network namespace lab: {exc}"
    return None


def nft_available() -> str | None:
    """Return None if nftables can be used in labs, else why not (for pytest.skip)."""
    if shutil.which("nft") is None:
        return "faults in a network namespace lab need nftables ('nft' not found)"
    return None


def nft(ns: str, script: str) -> None:
    """Run an nft script (``nft -f -``) inside namespace ``ns``."""
    proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script,
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"nft in {ns} failed ({proc.returncode}): {proc.stderr.strip()}\n{script}")


@dataclass
class Host:
    """One lab host: a network namespace with one address on the lab bridge."""

    name: str  # netns name
    addr: str  # IPv4 address on eth0
    ifname: str = "eth0"
    port: str = ""  # its veth's name on the bridge (``h<i>``)
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def exec_prefix(self) -> list[str]:
        """Argv prefix that runs a command inside this host's namespace."""
        return ["ip", "netns", "exec", self.name]

    def popen(self, args, **kw) -> subprocess.Popen:
        """``subprocess.Popen(args, **kw)`` inside the namespace; stopped at lab teardown."""
        proc = subprocess.Popen([*self.exec_prefix, *args], **kw)
        self._procs.append(proc)
        return proc

    def run(self, args, **kw) -> subprocess.CompletedProcess:
        """``subprocess.run(args, **kw)`` inside the namespace."""
        return subprocess.run([*self.exec_prefix, *args], **kw)

    def nft(self, script: str) -> None:
        """Run an nft script inside this host's namespace (its rules affect only it)."""
        nft(self.name, script)


class NetnsLab:
    """``n_hosts`` namespaces on one private bridge; a context manager.

    ``prefix`` starts every namespace name (default ``"zs"``). Attributes:
    ``hosts`` (list of ``Host``), ``bridge_ns`` (namespace holding ``br0``),
    ``network`` (e.g. ``"10.213.57.0/24"``).
    """

    def __init__(self, n_hosts: int, prefix: str | None = None, *, ipv6: bool = False):
        if not 1 <= n_hosts <= 240:
            raise ValueError("n_hosts must be between 1 and 240")
        prefix = prefix or DEFAULT_PREFIX
        if not re.fullmatch(r"[A-Za-z0-9_]{1,16}", prefix):
            raise ValueError("prefix must be 1-16 characters of [A-Za-z0-9_]")
        _sweep_stale(prefix)
        tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        x = random.randint(1, 254)
        self.network = f"10.213.{x}.0/24"
        self.bridge_ns = f"{tag}-br"
        self.hosts: list[Host] = []
        self._names: list[str] = []  # namespaces created so far, in order
        self._procs: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _delete_netns, self._names, self._procs)
        try:
            self._build(tag, x, n_hosts, ipv6)
        except BaseException:
            self.close()
            raise

    def _add_netns(self, name: str, ipv6: bool) -> None:
        _ip("netns", "add", name)
        self._names.append(name)
        if not ipv6:
            _ip("netns", "exec", name, "sysctl", "-q", "-w",
                "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self, tag: str, x: int, n_hosts: int, ipv6: bool) -> None:
        br = self.bridge_ns
        self._add_netns(br, ipv6)
        _ip("-n", br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", br, "link", "set", "br0", "up")
        for i in range(n_hosts):
            host = Host(name=f"{tag}-h{i}", addr=f"10.213.{x}.{10 + i}", port=f"h{i}", _procs=self._procs)
            self._add_netns(host.name, ipv6)
            _ip("-n", host.name, "link", "add", "eth0", "type", "veth",
                "peer", "name", f"h{i}", "netns", br)
            _ip("-n", br, "link", "set", f"h{i}", "master", "br0", "up")
            _ip("-n", host.name, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "multicast", "on", "up")
            _ip("-n", host.name, "route", "add", "224.0.0.0/4", "dev", "eth0")
            self.hosts.append(host)
        self._wait_links_up()

    def _wait_links_up(self) -> None:
        deadline = time.monotonic() + _SETUP_TIMEOUT
        pending = [(self.bridge_ns, "br0")] + [(h.name, "eth0") for h in self.hosts]
        while pending:
            pending = [
                (ns, dev) for ns, dev in pending
                if "state UP" not in _ip("-n", ns, "-o", "link", "show", dev).stdout
            ]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"links not up after {_SETUP_TIMEOUT}s: {pending}")
            if pending:
                time.sleep(0.02)

    # --- faults on one host's link, made at its bridge port (the switch), both ways ---
    def cut(self, host: Host) -> None:
        """Partition ``host`` from the rest: its bridge port drops every frame, ARP included.
        Its link stays up (no carrier change), as when a switch or a link between sites fails:
        packets vanish and nobody is told."""
        nft(self.bridge_ns, f"""table bridge zs_cut_{host.port} {{
  chain links {{
    type filter hook forward priority 0; policy accept;
    iifname "{host.port}" counter drop
    oifname "{host.port}" counter drop
  }}
}}
""")

    def mend(self, host: Host) -> None:
        """Undo :meth:`cut`."""
        nft(self.bridge_ns, f"delete table bridge zs_cut_{host.port}\n")

    def lossy(self, host: Host, one_in: int) -> None:
        """Drop one frame in ``one_in`` at random, each way, on ``host``'s bridge port."""
        nft(self.bridge_ns, f"""table bridge zs_loss_{host.port} {{
  chain links {{
    type filter hook forward priority 0; policy accept;
    iifname "{host.port}" numgen random mod {one_in} == 0 counter drop
    oifname "{host.port}" numgen random mod {one_in} == 0 counter drop
    iifname "{host.port}" counter
    oifname "{host.port}" counter
  }}
}}
""")

    def loss_counts(self, host: Host) -> tuple[int, int]:
        """(frames dropped, frames that crossed ``host``'s port) since :meth:`lossy`."""
        out = subprocess.run(["ip", "netns", "exec", self.bridge_ns, "nft", "list", "table", "bridge",
                              f"zs_loss_{host.port}"], capture_output=True, text=True, timeout=30).stdout
        counts = [int(n) for n in re.findall(r"counter packets (\d+)", out)]
        return (counts[0] + counts[1], counts[2] + counts[3]) if len(counts) == 4 else (0, 0)

    def clear_loss(self, host: Host) -> None:
        """Undo :meth:`lossy`."""
        nft(self.bridge_ns, f"delete table bridge zs_loss_{host.port}\n")

    def close(self) -> None:
        """Stop lab processes and delete every namespace of the lab. Idempotent."""
        if not self._finalizer.alive:
            return
        errors = self._finalizer()
        if errors:
            warnings.warn("NetnsLab cleanup incomplete: " + "; ".join(errors), RuntimeWarning)

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
