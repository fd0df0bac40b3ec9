"""gunicorn's entry point: ``gunicorn -c services/gunicorn.conf.py 'zswarm.http.wsgi:app_factory()'``.

Configuration comes from the environment, which the node sets when it starts gunicorn:

- ``ZSWARM_NODE_ENDPOINT`` (required): the node's ipc endpoint for HTTP workers, ``ipc:///...``.
- ``ZSWARM_ADDRESS``: where the server listens (``host:port``; gunicorn_conf.py binds it, or the
  node's socket passed as ``ZSWARM_HTTP_FD``). On a loopback address every route refuses a
  foreign ``Host`` (DNS rebinding, see access.py); elsewhere without API keys, one warning at
  start and one on the Swarm page say the API is open to the network.
- API keys: with ``ZSWARM_STATE_DIR``, asked of the node over its admin socket (command
  ``api_keys``) when the app is made, so that no key sits in this process's environment or argv;
  a node that does not answer within ``ZSWARM_KEYS_WAIT_S`` (10 s) stops the server (never an open
  API by mistake). Without ``ZSWARM_STATE_DIR`` (gunicorn run by hand): ``ZSWARM_API_KEYS``,
  comma-separated; empty or unset: no key needed.
- ``ZSWARM_NODE_NAME``: named in ``X-Zswarm-Node`` when no node answered; default: the host name.
- ``ZSWARM_NODE_TIMEOUT_S``: seconds without a word from the node before a request fails (300;
  a node that is down fails requests within 5 s, see NodeBackend).
- ``ZSWARM_MAX_BODY_BYTES``: largest request body accepted (1048576).
- ``ZSWARM_REQUEST_TIMEOUT_S``: a request's timeout unless it asks for another (600; see
  ``zswarm server --help``).
- ``ZSWARM_STATE_DIR``: the node's state directory, whose admin socket gives the cluster's
  nodes, the token and the node's counters (``/api/p2p``, ``/swarm``, ``/metrics``); unset:
  those routes answer 503 and ``/metrics`` has only this process's HTTP series.

The factory runs in each worker after the fork (gunicorn's default, ``preload_app = False``),
so no ZeroMQ state is ever shared between processes. The "open to the network" warning is logged
by the first worker a gunicorn master starts only (``ZSWARM_HTTP_WORKER_AGE``, set by
gunicorn_conf.py's ``post_fork``), so it appears once per start, not once per worker or recycle.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import falcon
from gunicorn.errors import AppImportError

from ..config import DEFAULT_REQUEST_TIMEOUT_S
from .access import bound_to_loopback
from .app import MAX_BODY_BYTES, create_app
from .cluster import AdminCluster, ClusterUnavailable
from .node_backend import NodeBackend

log = logging.getLogger(__name__)


class ConfigError(AppImportError):
    """gunicorn prints only the message of an AppImportError and stops (no traceback, no respawn)."""


def _number(env: dict[str, str], name: str, default: float, kind: type = float):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, not {raw}")
    return value


def app_factory(env: dict[str, str] | None = None) -> falcon.App:
    env = dict(os.environ if env is None else env)
    endpoint = env.get("ZSWARM_NODE_ENDPOINT", "").strip()
    if not endpoint:
        raise ConfigError("ZSWARM_NODE_ENDPOINT is not set: give the node's HTTP ipc endpoint, "
                          "e.g. ZSWARM_NODE_ENDPOINT=ipc:///var/lib/zswarm/http.sock")
    if "://" not in endpoint:
        raise ConfigError(f"ZSWARM_NODE_ENDPOINT={endpoint!r} is not a ZeroMQ endpoint (ipc:///path)")
    backend = NodeBackend(endpoint, timeout_s=_number(env, "ZSWARM_NODE_TIMEOUT_S", 300.0))
    state_dir = env.get("ZSWARM_STATE_DIR", "").strip()
    cluster = AdminCluster(state_dir) if state_dir else None
    if cluster is not None:
        keys = _node_keys(cluster, _number(env, "ZSWARM_KEYS_WAIT_S", 10.0))
    else:
        keys = [k.strip() for k in env.get("ZSWARM_API_KEYS", "").split(",") if k.strip()]
    address = env.get("ZSWARM_ADDRESS", "").strip() or None
    if address and not keys and not bound_to_loopback(address) and env.get("ZSWARM_HTTP_WORKER_AGE", "1") == "1":
        log.warning("the HTTP API at %s is open to the network without API keys: anyone who can reach "
                    "it can use the models and see the cluster (not the token); set API keys (--api-key) "
                    "or listen on 127.0.0.1", address)
    return create_app(
        backend,
        api_keys=keys,
        node_name=env.get("ZSWARM_NODE_NAME", "").strip() or socket.gethostname(),
        max_body_bytes=_number(env, "ZSWARM_MAX_BODY_BYTES", MAX_BODY_BYTES, int),
        cluster=cluster,
        request_timeout_s=_number(env, "ZSWARM_REQUEST_TIMEOUT_S", DEFAULT_REQUEST_TIMEOUT_S),
        bind_address=address,
    )


def _node_keys(cluster: AdminCluster, wait_s: float) -> list[str]:
    """The node's API keys over its admin socket, tried until ``wait_s`` passes (the node opens
    that socket before it starts this server, so the first try normally answers)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return cluster.api_keys()
        except ClusterUnavailable as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"could not read the node's API keys from its admin socket in "
                                  f"{cluster.state_dir}: {e}") from None
        time.sleep(0.2)
