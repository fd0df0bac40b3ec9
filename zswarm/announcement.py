"""The signed mDNS announcement: what a node puts in its TXT record, and how a receiver judges one.

Pure: no sockets, no clock of its own (callers pass the time), no zeroconf. The Discovery actor's
mDNS thread is the only user; the tests call it directly.

Format 2 (TXT keys): ``v`` the format, ``net`` the network id, ``id`` the node id, ``role``,
``a`` the announced addresses (comma-separated, the same ones the A/AAAA records carry), ``t``
the time of signing (Unix milliseconds), ``n`` a random nonce, and ``sig``: an HMAC-SHA256
(the token's discovery key) over all of them and the SRV port. Format 1 (before ``v``) signed only
the network id, node id and port, so a captured announcement re-sent with another address made
every node dial that host. A receiver dials only the announced addresses that the signature
covers, ignores announcements outside the time window, and remembers the latest (``t``, ``n``)
of each node id: anything older is a replay.

What is not a replay: zeroconf re-announces, caches and answers queries with the same records,
and a browser re-resolves on every update, so a node's current announcement arrives again and
again, byte for byte; that is a repeat, accepted without being counted. A node re-signs
(``REFRESH_S``) long before its announcement would grow stale, and its ``t`` only ever grows.

Formats are not mixed: a format-1 node fails format 2's signature and a format-2 node refuses
anything whose ``v`` is not its own, so old and new nodes ignore (and count) each other's
announcements; they still meet by bootstrap addresses and peer exchange.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass

from .token import Keys

VERSION = "2"  # the TXT format; "1" was the unversioned one (no ``v``, signature without address or time)
MAX_AGE_S = 300.0  # older than this is stale: REFRESH_S plus a sender's clock up to 4 minutes behind ours
MAX_AHEAD_S = 300.0  # further in the future than this is refused: a sender's clock up to 5 minutes ahead
REFRESH_S = 60.0  # a node re-signs its announcement this often, well inside MAX_AGE_S
ADDRESSES_MAX_CHARS = 240  # ``a`` must fit one TXT string (255 bytes with "a="); addresses past it are not announced
SIG_HEX = 32  # 128 bits of HMAC-SHA256, as format 1

# Why an announcement was ignored: each is counted as ``mdns_ignored_<reason>`` (and ``mdns_ignored``).
OTHER_NETWORK = "other_network"  # another cluster, or not zswarm
VERSION_MISMATCH = "version"  # a TXT format this node does not read (older or newer zswarm)
MALFORMED = "malformed"  # a field missing or unreadable
BAD_SIGNATURE = "signature"  # not signed with this cluster's key, or changed since
STALE = "stale"  # signed more than MAX_AGE_S ago
FUTURE = "future"  # signed more than MAX_AHEAD_S ahead of our clock
READDRESSED = "readdressed"  # none of the addresses it resolved to is one the signature covers
REPLAYED = "replayed"  # older than (or as old as, but not the same as) the latest seen from that node


@dataclass(frozen=True)
class Announcement:
    """A verified announcement; ``dial`` is the resolved addresses that the signature covers, in the
    sender's order; ``unsigned`` the resolved addresses it does not cover (never dialled)."""

    node_id: str
    role: str
    port: int
    t_ms: int
    nonce: str
    dial: tuple[str, ...]
    unsigned: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ignored:
    reason: str
    node_id: str = ""
    detail: str = ""


def canonical(address: str) -> str:
    """One spelling per address (``ValueError`` for anything that is not an IP address)."""
    return ipaddress.ip_address(address.strip()).compressed


def fit_addresses(addresses: list[str]) -> list[str]:
    """The addresses, canonical and without repeats, as many as ``a`` can carry."""
    out: list[str] = []
    for x in addresses:
        c = canonical(x)
        if c not in out and len(",".join([*out, c])) <= ADDRESSES_MAX_CHARS:
            out.append(c)
    return out


def _mac(keys: Keys, node_id: str, role: str, port: int, addresses: str, t_ms: str, nonce: str) -> str:
    # JSON keeps the fields apart whatever they contain; the version and network id make the
    # message mean nothing to another format or cluster.
    msg = json.dumps(["zswarm-mdns", VERSION, keys.network_id, node_id, role, port, addresses, t_ms, nonce],
                     separators=(",", ":")).encode()
    return hmac.new(keys.discovery_key, msg, hashlib.sha256).hexdigest()[:SIG_HEX]


def properties(keys: Keys, node_id: str, role: str, port: int, addresses: list[str], t_ms: int,
               nonce: str) -> dict[str, str]:
    """The TXT properties announcing this node at ``addresses`` (as :func:`fit_addresses` gives
    them: the A/AAAA records must carry the same) and ``port``, signed at ``t_ms``."""
    a = ",".join(addresses)
    return {"v": VERSION, "net": keys.network_id, "id": node_id, "role": role, "a": a, "t": str(t_ms),
            "n": nonce, "sig": _mac(keys, node_id, role, port, a, str(t_ms), nonce)}


def _text(props: dict, key: str) -> str:
    v = props.get(key.encode(), props.get(key))
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return v if isinstance(v, str) else ""


def verify(keys: Keys, props: dict, port: int, resolved: list[str], now_s: float) -> Announcement | Ignored:
    """Judge one resolved service: its TXT ``props`` (zeroconf gives ``bytes`` keys and values,
    ``None`` for a key without value), its SRV ``port``, the addresses its A/AAAA records resolved
    to, at ``now_s`` (Unix seconds). Never raises on what the network sent. Replays are the
    caller's :class:`ReplayGuard`'s to catch: this function keeps no state."""
    if _text(props, "net") != keys.network_id:
        return Ignored(OTHER_NETWORK)
    node_id = _text(props, "id")
    if _text(props, "v") != VERSION:
        return Ignored(VERSION_MISMATCH, node_id, f"format {_text(props, 'v') or '1'}")
    role, a, t, nonce, sig = (_text(props, k) for k in ("role", "a", "t", "n", "sig"))
    if not (node_id and t.isascii() and t.isdigit() and nonce and sig and a and 0 < port < 65536):
        return Ignored(MALFORMED, node_id)
    if not hmac.compare_digest(sig, _mac(keys, node_id, role, port, a, t, nonce)):
        return Ignored(BAD_SIGNATURE, node_id)
    age_s = now_s - int(t) / 1000
    if age_s > MAX_AGE_S:
        return Ignored(STALE, node_id, f"signed {age_s:.0f} s ago")
    if -age_s > MAX_AHEAD_S:
        return Ignored(FUTURE, node_id, f"signed {-age_s:.0f} s ahead of our clock")
    try:
        signed = [canonical(x) for x in a.split(",")]
    except ValueError:
        return Ignored(MALFORMED, node_id)
    got = set()
    for x in resolved:
        try:
            got.add(canonical(x))
        except ValueError:
            pass
    dial = tuple(x for x in signed if x in got)
    unsigned = tuple(sorted(got - set(signed)))
    if not dial:
        return Ignored(READDRESSED, node_id, f"resolved to {', '.join(unsigned) or 'nothing'}, signed for {a}")
    return Announcement(node_id, role, port, int(t), nonce, dial, unsigned)


class ReplayGuard:
    """The latest announcement seen from each node id (one thread: the mDNS thread).

    :meth:`check` says ``"new"`` (newer than any seen: remembered), ``"repeat"`` (the very one
    seen last: zeroconf's re-announcements, caches and updates) or :data:`REPLAYED`. Entries older
    than ``MAX_AGE_S`` are forgotten: anything as old is stale anyway, so memory follows the
    cluster's size, and only token holders can add entries at all (they must sign)."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[int, str]] = {}

    def check(self, ann: Announcement, now_s: float) -> str:
        self._forget(now_s)
        last = self._latest.get(ann.node_id)
        if last is None or ann.t_ms > last[0]:
            self._latest[ann.node_id] = (ann.t_ms, ann.nonce)
            return "new"
        return "repeat" if (ann.t_ms, ann.nonce) == last else REPLAYED

    def _forget(self, now_s: float) -> None:
        horizon_ms = (now_s - MAX_AGE_S) * 1000
        for node_id in [k for k, (t, _) in self._latest.items() if t < horizon_ms]:
            del self._latest[node_id]

    def __len__(self) -> int:
        return len(self._latest)
