"""``GET /metrics``: Prometheus text format through ``prometheus_client``.

Two kinds of series, in one registry per app (never prometheus_client's global one, so building
several apps in one process, as tests do, registers nothing twice):

- **HTTP series**, counted by this process as it answers completions: requests by node, model and
  status, requests in flight, tokens, time to first token and latency. With several gunicorn
  workers (``--http-workers``) each worker counts only what it served, and a scrape reaches one
  worker, so these series are one worker's share; ``rate()`` over them undercounts by the
  number of workers. The default is one worker. (prometheus_client's multiprocess mode would
  merge them, at the cost of a shared directory of mmap files; not worth it for one worker.)
- **Node series**, read from the node's admin socket at scrape time by :class:`NodeCollector`
  (through the same cached snapshot as ``/api/p2p``): peers by state, gossip messages and bytes,
  tunnel bytes, child restarts, re-shards, the gateway's requests and routing. These are the
  node's own counters, the same whichever worker answers. ``zswarm_node_up`` is 0 when the
  node could not be asked; the node series are then absent from that scrape.

Label values are bounded: ``model`` is a served model's name or "" (never what a client typed
for a model that does not exist), ``node`` a node id or "", ``status`` an HTTP status code.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterator

import falcon
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import wire
from .cluster import ClusterSource, ClusterUnavailable

log = logging.getLogger(__name__)

# Time to first token: prompt processing on a CPU takes from tens of milliseconds (a short chat)
# to tens of seconds (a long prompt on a slow worker split).
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Whole request: a few tokens to a few minutes of streaming.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Node counters (zswarm.transport.Stats names) -> (metric, label name, label value).
# Counters named here and absent from a node (a federated entry point has no engine, tunnels
# come with worker mode) are reported as 0 so that dashboards and alerts see the series.
_COUNTERS: dict[str, tuple[str, str, str]] = {
    "gossip_in": ("zswarm_gossip_messages", "direction", "in"),
    "gossip_out": ("zswarm_gossip_messages", "direction", "out"),
    "gossip_in_bytes": ("zswarm_gossip_bytes", "direction", "in"),
    "gossip_out_bytes": ("zswarm_gossip_bytes", "direction", "out"),
    "tunnel_bytes_in": ("zswarm_tunnel_bytes", "direction", "in"),
    "tunnel_bytes_out": ("zswarm_tunnel_bytes", "direction", "out"),
    "requests_in": ("zswarm_gateway_requests", "outcome", "received"),
    "requests_done": ("zswarm_gateway_requests", "outcome", "done"),
    "requests_failed": ("zswarm_gateway_requests", "outcome", "failed"),
    "requests_retried": ("zswarm_gateway_requests", "outcome", "retried"),
    "requests_cancelled": ("zswarm_gateway_requests", "outcome", "cancelled"),
    "reshards": ("zswarm_reshards", "", ""),
}
_HELP = {
    "zswarm_gossip_messages": "Gossip messages received and sent by the node",
    "zswarm_gossip_bytes": "Gossip bytes received and sent by the node",
    "zswarm_tunnel_bytes": "llama.cpp RPC bytes carried through the node's CURVE tunnels",
    "zswarm_gateway_requests": "Requests seen by the node's gateway, by outcome",
    "zswarm_reshards": "Times the node re-split its model across workers",
}
PEER_STATES = ("alive", "suspect", "dead")


class HttpMetrics:
    """The HTTP series of one app; :meth:`track` follows one completion request."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("zswarm_http_requests", "Completion requests answered, by serving node, model and "
                                "HTTP status (499: the client went away)", ["node", "model", "status"],
                                registry=registry)
        self.in_flight = Gauge("zswarm_http_in_flight", "Completion requests this process is answering now",
                               registry=registry)
        self.tokens = Counter("zswarm_tokens_generated", "Completion tokens generated, by serving node and model",
                              ["node", "model"], registry=registry)
        self.prompt_tokens = Counter("zswarm_prompt_tokens", "Prompt tokens processed, by serving node and model",
                                     ["node", "model"], registry=registry)
        self.cached_tokens = Counter("zswarm_prompt_tokens_cached", "Prompt tokens the serving engine had cached "
                                     "already (its prefix cache), by serving node and model", ["node", "model"],
                                     registry=registry)
        self.prefix_hits = Counter("zswarm_prefix_cache_hits", "Requests whose prompt started with what the "
                                   "serving engine had cached, by serving node and model", ["node", "model"],
                                   registry=registry)
        self.ttft = Histogram("zswarm_time_to_first_token_seconds", "From the request's arrival to its first token",
                              ["model"], buckets=TTFT_BUCKETS_S, registry=registry)
        self.latency = Histogram("zswarm_request_duration_seconds", "From the request's arrival to its last byte",
                                 ["model"], buckets=LATENCY_BUCKETS_S, registry=registry)

    def track(self) -> "Track":
        return Track(self)


class Track:
    """One request; :meth:`end` counts it once, whichever path (error, stream end, disconnect) gets there first."""

    def __init__(self, m: HttpMetrics):
        self._m = m
        self._t0 = time.monotonic()
        self._first = False
        self._ended = False
        self._lock = threading.Lock()
        self.model = ""  # set once the model is known to be served (bounded label values)
        m.in_flight.inc()

    def first_token(self) -> None:
        if not self._first:
            self._first = True
            self._m.ttft.labels(self.model).observe(time.monotonic() - self._t0)

    def end(self, status: int, node: str = "", done: wire.Done | None = None) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        m = self._m
        m.in_flight.dec()
        m.requests.labels(node, self.model, str(status)).inc()
        if done is not None:
            self.first_token()  # an answer with no token at all: its first "token" is its end
            m.tokens.labels(node, self.model).inc(max(0, done.completion_tokens))
            m.prompt_tokens.labels(node, self.model).inc(max(0, done.prompt_tokens))
            m.cached_tokens.labels(node, self.model).inc(max(0, done.cached_tokens))
            if done.cached_tokens > 0:
                m.prefix_hits.labels(node, self.model).inc()
        if self.model:
            m.latency.labels(self.model).observe(time.monotonic() - self._t0)


class NodeCollector(Collector):
    """The node's own figures, read from its admin socket at each scrape."""

    def __init__(self, source: ClusterSource):
        self._source = source

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("zswarm_node_up", "1 when the node answered this scrape through its admin socket")
        try:
            snap = self._source.snapshot()
        except ClusterUnavailable as e:
            log.debug("metrics: node not available: %s", e)
            up.add_metric([], 0)
            yield up
            return
        except Exception:  # a scrape must never fail because of the node's answer
            log.exception("metrics: reading the node failed")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _node_families(snap.status, snap.peers)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _node_families(status: dict[str, Any], peers: list[dict[str, Any]]) -> Iterator[Metric]:
    info = GaugeMetricFamily("zswarm_node_info", "This node (value 1)", labels=["id", "name", "role", "network_id"])
    info.add_metric([str(status.get("id", "")), str(status.get("name", "")), str(status.get("role", "")),
                     str(status.get("network_id") or "")], 1)
    yield info

    by_state = {s: 0 for s in PEER_STATES}
    for p in peers:
        if isinstance(p, dict) and p.get("state") in by_state:
            by_state[p["state"]] += 1
    fam = GaugeMetricFamily("zswarm_peers", "Peers this node knows, by state", labels=["state"])
    for state, n in by_state.items():
        fam.add_metric([state], n)
    yield fam

    counters = status.get("counters") if isinstance(status.get("counters"), dict) else {}
    families: dict[str, CounterMetricFamily] = {}
    for key, (name, label, value) in _COUNTERS.items():
        fam = families.get(name)
        if fam is None:
            fam = families[name] = CounterMetricFamily(name, _HELP[name], labels=[label] if label else [])
        fam.add_metric([value] if label else [], _num(counters.get(key)))
    yield from families.values()

    restarts = CounterMetricFamily("zswarm_child_restarts", "Restarts of the node's child processes "
                                   "(engine: the inference engine; http: this API)", labels=["child"])
    children = status.get("children") if isinstance(status.get("children"), dict) else {}
    names = set(children) | {k[len("restarts_"):] for k in counters if k.startswith("restarts_")}
    if status.get("role") == "server":
        names.add("engine")
    for child in sorted(names):
        restarts.add_metric([child], _num(counters.get(f"restarts_{child}")))
    yield restarts

    mapped = set(_COUNTERS) | {k for k in counters if k.startswith("restarts_")}
    events = CounterMetricFamily("zswarm_node_events", "The node's other counters (refused handshakes, bad "
                                 "frames, dropped replies...), by name", labels=["event"])
    for key in sorted(set(counters) - mapped):
        events.add_metric([key], _num(counters[key]))
    yield events

    gateway = status.get("gateway") if isinstance(status.get("gateway"), dict) else None
    if gateway is not None:
        g = GaugeMetricFamily("zswarm_gateway_in_flight", "Requests in flight through this node's gateway")
        g.add_metric([], _num(gateway.get("in_flight")))
        yield g
        names_by_id = {r.get("node"): r.get("name", "") for r in gateway.get("routes") or [] if isinstance(r, dict)}
        per_node = gateway.get("per_node_in_flight") or {}
        fam = GaugeMetricFamily("zswarm_node_in_flight", "Requests this node's gateway has in flight on each node",
                                labels=["node", "name"])
        for node, n in sorted(per_node.items()):
            fam.add_metric([str(node), str(names_by_id.get(node, ""))], _num(n))
        yield fam
        served = gateway.get("served") or {}
        fam = CounterMetricFamily("zswarm_routed_requests", "Requests this node's gateway routed to each node",
                                  labels=["node", "name"])
        for node, n in sorted(served.items()):
            fam.add_metric([str(node), str(names_by_id.get(node, ""))], _num(n))
        yield fam
        g = GaugeMetricFamily("zswarm_routable_nodes", "Nodes this node can route requests to now")
        g.add_metric([], len(gateway.get("routes") or []))
        yield g


def make_registry(source: ClusterSource | None) -> tuple[CollectorRegistry, HttpMetrics]:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # this worker's CPU, memory and open files
    metrics = HttpMetrics(registry)
    if source is not None:
        registry.register(NodeCollector(source))
    return registry, metrics


class MetricsResource:
    """GET /metrics."""

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = generate_latest(self._registry)
        resp.content_type = CONTENT_TYPE_LATEST
        resp.cache_control = ["no-store"]
