"""gunicorn's entry point: ``gunicorn -c services/gunicorn.conf.py 'zswarm.http.wsgi:app_factory()'``.

Configuration comes from the environment, which the node sets when it starts gunicorn:

- ``ZSWARM_NODE_ENDPOINT`` (required): the node's ipc endpoint for HTTP workers, ``ipc:///...``.
- ``ZSWARM_API_KEYS``: comma-separated keys; empty or unset: no key needed.
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
so no ZeroMQ state is ever shared between processes.
"""

from __future__ import annotations

import os
import socket

import falcon
from gunicorn.errors import AppImportError

from ..config import DEFAULT_REQUEST_TIMEOUT_S
from .app import MAX_BODY_BYTES, create_app
from .cluster import AdminCluster
from .node_backend import NodeBackend


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
    return create_app(
        backend,
        api_keys=[k.strip() for k in env.get("ZSWARM_API_KEYS", "").split(",") if k.strip()],
        node_name=env.get("ZSWARM_NODE_NAME", "").strip() or socket.gethostname(),
        max_body_bytes=_number(env, "ZSWARM_MAX_BODY_BYTES", MAX_BODY_BYTES, int),
        cluster=AdminCluster(state_dir) if state_dir else None,
        request_timeout_s=_number(env, "ZSWARM_REQUEST_TIMEOUT_S", DEFAULT_REQUEST_TIMEOUT_S),
    )
