"""The OpenAI-compatible HTTP front of a node: a Falcon WSGI app run by gunicorn workers.

Every request is handed to a :class:`~zswarm.http.backend.Backend`; in production that is a
:class:`~zswarm.http.node_backend.NodeBackend` speaking to the node over its ipc socket. The
gunicorn worker processes are forked apart from the node, so this package must NEVER import
pykka, nor anything that starts actors or threads at import time.
"""

from .app import create_app
from .backend import Backend, BackendUnavailable

__all__ = ["create_app", "Backend", "BackendUnavailable"]
