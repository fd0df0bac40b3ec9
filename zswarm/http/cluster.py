"""What the HTTP app knows about the cluster: ``/api/p2p``, ``/api/p2p/stats``, ``/api/p2p/token``.

The data comes from the node's admin socket (``status``, ``peers``, ``ledger``, ``token``; and,
once per process, ``api_keys``, see :meth:`AdminCluster.api_keys`), read
through :class:`AdminCluster`, which keeps one snapshot for ``ttl_s`` so that a page polling
every second, a Prometheus scrape and a few API clients cost the node one round of admin calls,
not one each. The shaping of that data into nodes by role is :func:`cluster_view`, a pure
function (no socket), so it is tested on its own.

Groups (the keys of ``/api/p2p``), from each node's role and flags:

- ``federated``: servers started with ``--p2p --federated``: they hold a model and take requests
  routed from the cluster;
- ``servers``: other servers (a model of their own, or one split across workers);
- ``workers``: ``zswarm worker`` nodes, which lend memory to a server's split model;
- ``balancers``: ``zswarm federated`` nodes, model-less entry points that route each request.

A worker serves one server's split at a time: each worker says which server holds it
(``held_by``, from the servers' claims in the ledger), and ``taken`` lists the workers this node's
split leaves out because another server holds them.

The same nodes also appear as LocalAI's ``/api/p2p`` names them (``llama_cpp_nodes`` and, as
older LocalAI called it, ``nodes``: the workers; ``federated_nodes``; ``mlx_nodes``, empty),
each a LocalAI ``NodeData`` (``Name``, ``ID``, ``TunnelAddress``, ``ServiceID``, ``LastSeen``).

A node is ``online`` while the ledger holds it alive (heard from within the last 2 s); it is
``suspect`` after 2 s without news, ``dead`` after 4 s, and leaves the list 30 s later.
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import falcon
import msgspec

from ..sharding import claims_of_records, holders
from .access import check_token_access
from .errors import ApiError

GROUPS = ("federated", "workers", "servers", "balancers")


class ClusterUnavailable(RuntimeError):
    """The node's admin socket could not be asked (node down, restarting, or not configured)."""


@dataclass(frozen=True)
class Snapshot:
    status: dict[str, Any]
    peers: list[dict[str, Any]]
    ledger: list[dict[str, Any]]
    taken_at: float  # unix seconds


class ClusterSource(Protocol):
    """The node's view of the cluster; every method may be called from any worker thread."""

    def snapshot(self) -> Snapshot:
        """Raises :class:`ClusterUnavailable`."""
        ...

    def token(self) -> str:
        """The cluster token, or "" when the node is in no cluster; raises :class:`ClusterUnavailable`."""
        ...


class AdminCluster:
    """A :class:`ClusterSource` over the node's admin socket in ``state_dir``.

    ``ttl_s`` (0.5 s) is short next to the page's refresh (1 s) and the ledger's suspect time
    (2 s), so what the page shows is never more than one refresh behind the node. One caller at
    a time refreshes; the others wait for its result instead of asking the node again.
    """

    def __init__(self, state_dir: str, timeout_s: float = 2.5, ttl_s: float = 0.5):
        self.state_dir = state_dir
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None
        self._snap_mono = 0.0

    def _call(self, command: str) -> Any:
        from ..admin_client import AdminFailed, AdminUnavailable, call

        try:
            return call(self.state_dir, command, timeout_s=self.timeout_s)
        except (AdminUnavailable, AdminFailed, OSError) as e:
            raise ClusterUnavailable(str(e)) from None
        except Exception as e:  # a malformed reply (msgspec) or a ZeroMQ error: still "unavailable"
            raise ClusterUnavailable(f"{type(e).__name__}: {e}") from None

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._snap is not None and time.monotonic() - self._snap_mono < self.ttl_s:
                return self._snap
            status, peers, ledger = self._call("status"), self._call("peers"), self._call("ledger")
            if not isinstance(status, dict) or not isinstance(peers, list) or not isinstance(ledger, list):
                raise ClusterUnavailable("the node's admin socket answered something unexpected")
            self._snap = Snapshot(status, peers, ledger, time.time())
            self._snap_mono = time.monotonic()
            return self._snap

    def token(self) -> str:
        # Asked each time: a rotation (zswarm admin rotate-token) changes it under a running node.
        token = self._call("token")
        return token if isinstance(token, str) else ""

    def api_keys(self) -> list[str]:
        """The node's API keys (the app factory asks once): they reach the HTTP server over this
        socket (mode 0600, the node's user only), never through its environment or argv, where
        other processes could read them. Raises :class:`ClusterUnavailable`."""
        keys = self._call("api_keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ClusterUnavailable("the node's admin socket answered something unexpected for api_keys")
        return [k for k in keys if k]


# --- shaping (pure) ---

def group_of(role: str, flags: list[str]) -> str | None:
    if role == "worker":
        return "workers"
    if role == "federated":
        return "balancers"
    if role == "server":
        return "federated" if "federated" in flags else "servers"
    return None  # a peer whose record has not arrived yet: listed once it has


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _host_port(endpoint: str) -> str:
    return endpoint.split("://", 1)[-1]


def cluster_view(snap: Snapshot) -> dict[str, Any]:
    """The body of ``GET /api/p2p``: this node, every known node by group, and the model split."""
    status = snap.status
    self_id = str(status.get("id", ""))
    gateway = status.get("gateway") or {}
    per_node_in_flight = gateway.get("per_node_in_flight") or {}
    served = gateway.get("served") or {}
    # Every server reports its shard; the model is split only while the plan has workers.
    shard = status.get("shard") if isinstance(status.get("shard"), dict) else None
    split = bool(shard and [w for w in shard.get("workers") or [] if isinstance(w, dict)])
    layers: dict[str, int] = {}
    if split:
        for w in shard.get("workers") or []:
            if isinstance(w, dict) and isinstance(w.get("id"), str):
                layers[w["id"]] = _int(w.get("layers"))
        layers[self_id] = _int(shard.get("local_layers"))
    elif shard and _int(shard.get("local_layers")):
        layers[self_id] = _int(shard.get("local_layers"))  # the whole model, here
    records = {r.get("id"): r for r in snap.ledger if isinstance(r, dict)}
    own = records.get(self_id) or {}
    liveness = {p.get("id"): p for p in snap.peers if isinstance(p, dict)}
    states = {p.get("id"): p.get("state") for p in liveness.values()} | {self_id: "alive"}
    held = holders(claims_of_records(snap.ledger), states)
    out: dict[str, Any] = {g: [] for g in GROUPS}
    entries = [(self_id, own, {"state": "alive", "last_seen_s": 0.0})]
    entries += [(pid, records.get(pid) or p, p) for pid, p in liveness.items() if pid != self_id]
    for node_id, rec, live in entries:
        role = rec.get("role") or (status.get("role") if node_id == self_id else "") or ""
        flags = list(rec.get("flags") or (status.get("flags") if node_id == self_id else []) or [])
        group = group_of(role, flags)
        if group is None or not node_id:
            continue
        state = live.get("state", "dead")
        in_flight = per_node_in_flight.get(node_id, rec.get("in_flight", 0))
        out[group].append({
            "id": node_id,
            "name": rec.get("name") or (status.get("name") if node_id == self_id else "") or "",
            "role": role,
            "self": node_id == self_id,
            "state": state,
            "online": state == "alive",
            "last_seen_s": float(live.get("last_seen_s") or 0.0),
            "endpoints": dict(rec.get("endpoints") or {}),
            "models": list(rec.get("models") or []),
            # model files it is fetching from peers (depot/), and how far
            "fetching": _fetching(rec),
            "mem_total": _int(rec.get("mem_total")),
            "mem_free": _int(rec.get("mem_free")),
            "in_flight": _int(in_flight),
            # with a split model: what each node holds (0: a worker left out); without: unknown
            "layers": layers.get(node_id, 0 if split and role == "worker" else None),
            # requests its engine answered, and of those with part of the prompt in its prompt
            # cache, as the node itself counts them (its record), so every node's page shows the
            # same figures; a record without them: what this node routed there
            "served": _int(rec["served"]) if "served" in rec else _int(served.get(node_id, 0)),
            "prefix_hits": _int(rec.get("prefix_hits")),
            "decode_tps": _tps(rec.get("decode_tps")),
            "flags": flags,
            "software": rec.get("software") or "",
            "started_at": float(rec.get("started_at") or 0.0),
            # a worker: the server whose split it serves (None: free, or not a worker)
            "held_by": _holder(held.get(node_id), records, liveness, self_id) if role == "worker" else None,
        })
    for group in GROUPS:
        out[group].sort(key=lambda n: (not n["self"], n["name"], n["id"]))
    gossip = (status.get("endpoints") or {}).get("gossip")
    return {
        "node": {
            "id": self_id,
            "name": status.get("name") or "",
            "role": status.get("role") or "",
            "network_id": status.get("network_id"),
            "gossip": _host_port(gossip) if gossip else None,
            "software": status.get("software") or "",
        },
        **out,
        "split": _split(shard, own, self_id, status, out["workers"]) if split else None,
        "taken": _taken(shard),
        # workers whose RPC servers are starting: the split waits for them (a bounded time)
        "waiting": _waiting(shard),
        "revoked": _revoked(status),
        "shard_note": shard.get("note") if shard and isinstance(shard.get("note"), str) and shard["note"] else None,
        # why this server's model cannot be placed (a shortfall, no device): None when it can
        "shard_error": shard.get("error") if shard and isinstance(shard.get("error"), str) and shard["error"] else None,
        "updated_at": snap.taken_at,
        # the same nodes as LocalAI's /api/p2p names them (its schema.P2PNodesResponse and
        # NodeData), so LocalAI's tooling and its users' scripts read them: workers (older
        # LocalAI: "nodes") and the servers that take federated requests
        **localai_view(out, snap.taken_at),
    }


def localai_view(groups: dict[str, list[dict[str, Any]]], now: float) -> dict[str, Any]:
    def node(n: dict[str, Any], service: str, endpoint: str) -> dict[str, Any]:
        seen = datetime.datetime.fromtimestamp(now - n["last_seen_s"], datetime.timezone.utc)
        return {"Name": n["name"], "ID": n["id"], "TunnelAddress": _host_port(n["endpoints"].get(endpoint, "")),
                "ServiceID": service, "LastSeen": seen.isoformat(timespec="seconds").replace("+00:00", "Z"),
                "online": n["online"]}
    workers = [node(n, "worker", "tunnel") for n in groups["workers"]]
    return {"nodes": workers, "llama_cpp_nodes": workers, "mlx_nodes": [],
            "federated_nodes": [node(n, "federated", "gateway") for n in groups["federated"]]}


def _tps(value: Any) -> float:
    return round(float(value), 1) if isinstance(value, (int, float)) and 0 <= value < 1e7 else 0.0


def _fetching(rec: dict) -> list[dict[str, Any]]:
    out = []
    for h in rec.get("holdings") or []:
        if isinstance(h, dict) and isinstance(h.get("name"), str) and 0 <= _int(h.get("have")) < _int(h.get("size")):
            out.append({"name": h["name"], "percent": round(100 * _int(h["have"]) / _int(h["size"]), 1)})
    return out


def _name_of(node_id: str, records: dict, liveness: dict) -> str:
    name = (records.get(node_id) or {}).get("name") or (liveness.get(node_id) or {}).get("name") or ""
    return name if isinstance(name, str) else ""


def _holder(claim: Any, records: dict, liveness: dict, self_id: str) -> dict[str, Any] | None:
    if claim is None:
        return None
    return {"id": claim.server, "name": _name_of(claim.server, records, liveness), "self": claim.server == self_id,
            "held": claim.held}


def _waiting(shard: dict | None) -> list[str]:
    """Names of the workers this node's split waits for (their RPC servers are starting)."""
    waiting = (shard or {}).get("waiting")
    return [w["name"] if isinstance(w.get("name"), str) and w["name"] else w["id"][:8]
            for w in (waiting if isinstance(waiting, list) else [])
            if isinstance(w, dict) and isinstance(w.get("id"), str)]


def _taken(shard: dict | None) -> list[dict[str, str]]:
    """Workers this node's split leaves out because another server holds them (its shard report)."""
    out = []
    for t in (shard or {}).get("taken") or []:
        if isinstance(t, dict) and isinstance(t.get("id"), str) and isinstance(t.get("by"), str):
            out.append({k: t.get(k) if isinstance(t.get(k), str) else "" for k in ("id", "name", "by", "by_name")})
    return out


def _revoked(status: dict) -> list[dict[str, Any]]:
    """Nodes the cluster's operator revoked (zswarm admin revoke), newest first."""
    out = []
    for r in status.get("revoked") or []:
        if isinstance(r, dict) and isinstance(r.get("id"), str):
            out.append({"id": r["id"], "name": r.get("name") if isinstance(r.get("name"), str) else "",
                        "at": float(r["at"]) if isinstance(r.get("at"), (int, float)) else 0.0})
    return sorted(out, key=lambda r: -r["at"])


def _split(shard: dict, own: dict, self_id: str, status: dict, workers: list[dict]) -> dict[str, Any]:
    """The model's layers by holder, this node first (bars on the page)."""
    names = {w["id"]: w["name"] for w in workers}
    parts = []
    local = _int(shard.get("local_layers"))
    if local:
        parts.append({"id": self_id, "name": own.get("name") or status.get("name") or "", "layers": local,
                      "mem": _int(own.get("mem_total")), "local": True})
    for w in shard.get("workers") or []:
        if not isinstance(w, dict) or not isinstance(w.get("id"), str):
            continue
        parts.append({"id": w["id"], "name": str(w.get("name") or names.get(w["id"], "")),
                      "layers": _int(w.get("layers")), "mem": _int(w.get("mem")), "local": False})
    models = own.get("models") or []
    error = shard.get("error")
    return {"model": models[0] if models else None, "n_layers": _int(shard.get("n_layers")), "parts": parts,
            "reshards": _int(shard.get("reshards")), "error": error if isinstance(error, str) and error else None}


def cluster_stats(view: dict[str, Any]) -> dict[str, Any]:
    """The body of ``GET /api/p2p/stats``: online and total per group, and over all nodes."""
    out = {g: {"online": sum(n["online"] for n in view[g]), "total": len(view[g])} for g in GROUPS}
    out["all"] = {"online": sum(v["online"] for v in out.values()), "total": sum(v["total"] for v in out.values())}
    return out


# --- resources ---

def _unavailable(e: Exception) -> ApiError:
    return ApiError(503, f"The node's cluster state is not available: {e}", code="node_unavailable")


def _json(resp: falcon.Response, body: Any) -> None:
    resp.data = msgspec.json.encode(body)
    resp.content_type = falcon.MEDIA_JSON
    resp.cache_control = ["no-store"]


class _NoCluster:
    """Stands in when the HTTP server was started without the node's state directory."""

    def snapshot(self) -> Snapshot:
        raise ClusterUnavailable("this HTTP server was started without ZSWARM_STATE_DIR")

    def token(self) -> str:
        raise ClusterUnavailable("this HTTP server was started without ZSWARM_STATE_DIR")


NO_CLUSTER = _NoCluster()


class Nodes:
    """GET /api/p2p and GET /api/p2p/stats. ``open_to_network``: this server listens on a
    non-loopback address without API keys; ``node.open_to_network`` says so, for the page's
    warning."""

    def __init__(self, source: ClusterSource, open_to_network: bool = False):
        self._source = source
        self._open = open_to_network

    def _view(self) -> dict[str, Any]:
        try:
            return cluster_view(self._source.snapshot())
        except ClusterUnavailable as e:
            raise _unavailable(e) from None

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        view = self._view()
        view["node"]["open_to_network"] = self._open
        _json(resp, view)

    def on_get_stats(self, req: falcon.Request, resp: falcon.Response) -> None:
        _json(resp, cluster_stats(self._view()))


class TokenText:
    """GET /api/p2p/token: the token as text/plain. With API keys (``keys_set``) the key check
    guards it like the rest; without, only a client on this machine that named a loopback
    ``Host`` gets it, anyone else a 403 saying how to get it (access.py)."""

    def __init__(self, source: ClusterSource, keys_set: bool = False):
        self._source = source
        self._keys_set = keys_set

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        check_token_access(req, self._keys_set)
        try:
            token = self._source.token()
        except ClusterUnavailable as e:
            raise _unavailable(e) from None
        if not token:
            raise ApiError(404, "This node is not part of a cluster (start it with --p2p or --token).",
                           code="no_cluster")
        resp.text = token
        resp.content_type = falcon.MEDIA_TEXT
        resp.cache_control = ["no-store"]
