"""gunicorn settings for zswarm's HTTP API (a gunicorn config module).

The node starts gunicorn with ``-c python:zswarm.http.gunicorn_conf`` so the settings ship with
the package; ``services/gunicorn.conf.py`` loads this module for a gunicorn run by hand. The app
itself is configured by ZSWARM_NODE_ENDPOINT and friends (see zswarm/http/wsgi.py); this module
only shapes the server. Each setting may be overridden by the environment variable named next
to it. The gunicorn master imports this before forking: keep it cheap and free of side effects.
"""

import logging
import os

# Where clients connect. Loopback by default: the API is opened to the network on purpose
# (ZSWARM_ADDRESS=0.0.0.0:8080), ideally with ZSWARM_API_KEYS set. A node binds ZSWARM_ADDRESS
# itself and hands the listening socket down as ZSWARM_HTTP_FD (zswarm/startup.py): an address
# in use is then the node's own one-line error at start, not five retries here and a restart loop.
bind = ([f"fd://{os.environ['ZSWARM_HTTP_FD']}"] if os.environ.get("ZSWARM_HTTP_FD")
        else [os.environ.get("ZSWARM_ADDRESS", "127.0.0.1:8080")])

# gthread: a streamed answer holds its thread for as long as tokens flow (seconds to minutes)
# while doing nothing but waiting on the node's socket, so threads, not processes, are the unit
# of concurrency. The thread that answers a request also iterates its streamed body, which is
# what lets each thread keep its own ZeroMQ socket to the node (and cancel on that socket).
# zswarm's subclass of it (zswarm/http/worker.py) reads each request's header block in the
# worker's main loop with a deadline (ZSWARM_HTTP_HEADER_TIMEOUT_S, 10 s) and gives a thread only
# to a connection whose headers are all in, and it bounds the body read
# (ZSWARM_HTTP_BODY_TIMEOUT_S, 30 s): slow clients cost a descriptor each, not a thread. Plain
# gthread (gunicorn < 27, whose internals the subclass does not know) let 16 slow-header clients
# stop /healthz for as long as they liked; figures in docs/RELIABILITY.md ("Slow HTTP clients").
def _worker_class() -> str:
    from gunicorn.workers import gthread

    if hasattr(gthread.ThreadWorker, "murder_pending") and hasattr(gthread.ThreadWorker, "enqueue_req"):
        return "zswarm.http.worker.HeaderFirstWorker"
    return "gthread"


worker_class = _worker_class()

# One process by default (the node's --http-workers sets this). A second keeps the API up while
# the first is recycled (max_requests below) and adds a GIL for JSON and SSE encoding; more buys
# nothing, since generation happens in the node's engine, a handful of requests at a time.
workers = int(os.environ.get("ZSWARM_HTTP_WORKERS", "1"))

# Requests in flight per process: 32, twice what an engine has slots for, so the node's queue
# (which answers "overloaded" fairly) decides, not the HTTP layer, even while clients that send
# their bodies slowly hold some threads (each for at most ZSWARM_HTTP_BODY_TIMEOUT_S).
threads = int(os.environ.get("ZSWARM_HTTP_THREADS", "32"))

# Connections per process, idle or reading their headers included (each a descriptor; the
# worker stops accepting past it). gunicorn's default.
worker_connections = 1000

# With gthread this is NOT a per-request limit: the worker's main loop tells the master it is
# alive every second whatever its threads are doing, so a ten-minute stream is never killed.
# It only restarts a worker whose main loop hangs. The app's own limit on a silent node is
# ZSWARM_NODE_TIMEOUT_S. (0 would mean "never restart a hung worker", which we do not want.)
timeout = 30

# On restart or stop, streams still running get this long to finish before they are cut.
graceful_timeout = 30

# Seconds an idle keep-alive connection is held; OpenAI clients reuse connections (httpx).
keepalive = 5

# Recycle each worker after this many requests (jittered so workers never restart together), a
# cheap guard against slow leaks in a long-lived process.
max_requests = 10000
max_requests_jitter = 1000

# The app is created in each worker after the fork (never preloaded in the master), so no
# ZeroMQ context or socket is ever inherited across fork.
preload_app = False

# Access log off: a line per request is work on the hot path and noise in the journal, and
# request counts belong in /metrics. ZSWARM_HTTP_ACCESS_LOG=- turns it on (stderr) for debugging.
accesslog = os.environ.get("ZSWARM_HTTP_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("ZSWARM_HTTP_LOG_LEVEL", "info")

# gunicorn's own control socket ($XDG_RUNTIME_DIR/gunicorn.ctl) has one fixed path per user, so
# two nodes on one host would fight over it; the node's admin socket is the control interface.
control_socket_disable = True

# Headers and request lines of OpenAI clients are short; keep gunicorn's bounds on them.
limit_request_line = 8190
limit_request_fields = 100


def on_starting(server) -> None:
    """The master, before it forks: die with the node that started it (see engine/child.py)."""
    from zswarm.engine.child import die_with_parent

    die_with_parent()


def post_fork(server, worker) -> None:
    """Runs in each worker after the fork, before the app is made: zswarm's own log lines (the
    app factory's included) go where gunicorn's errors go, and the factory learns whether it is
    the first worker of this master (``worker.age`` counts the workers the master started), so a
    warning at start is logged once, not once per worker (zswarm/http/wsgi.py)."""
    os.environ["ZSWARM_HTTP_WORKER_AGE"] = str(worker.age)
    zlog = logging.getLogger("zswarm")
    zlog.handlers[:] = worker.log.error_log.handlers
    zlog.setLevel(worker.log.error_log.level)
    zlog.propagate = False
