"""The Falcon WSGI app: OpenAI's routes on top of a Backend.

Streaming answers are generators handed to the WSGI server as the response body. The server
closes that iterator when the client goes away (gunicorn's gthread worker calls ``close()`` in a
``finally`` once a write to the socket fails), which raises GeneratorExit inside the generator;
its ``finally`` then cancels the request on the node. A generator that was never started would
skip its ``finally`` on ``close()``, so each one is advanced to a first, empty ``yield`` before
the server sees it.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from typing import Iterable, Iterator

import falcon
import msgspec

from .. import wire
from . import schema
from .backend import Backend, BackendUnavailable, Reply
from .access import LoopbackHostOnly, bound_to_loopback
from .cluster import NO_CLUSTER, ClusterSource, Nodes, TokenText
from ..config import DEFAULT_REQUEST_TIMEOUT_S, ConfigError, parse_seconds
from .errors import NODE_HEADER, RETRY_LATER, TIMEOUT_HEADER, ApiError, from_fail, handle_unexpected, serialize_error
from .metrics import HttpMetrics, MetricsResource, Track, make_registry
from .openapi import OpenApi
from .pages import Root, Static

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a long chat history is tens of KiB; anything near 1 MiB is a mistake or an attack
# Answered without an API key: health checks (load balancers, systemd), the API's description,
# and the Swarm page's static files, which hold no data (the page asks for a key, then fetches
# the cluster data and the token through the guarded /api/p2p routes).
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/openapi.json", "/swarm"})
PUBLIC_PREFIXES = ("/swarm/",)


def create_app(backend: Backend, api_keys: Iterable[str] = (), node_name: str = "",
               max_body_bytes: int = MAX_BODY_BYTES, cluster: ClusterSource | None = None,
               request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, bind_address: str | None = None) -> falcon.App:
    """The app for one node. ``node_name`` goes in ``X-Zswarm-Node`` when no node answered.
    ``request_timeout_s``: a completion's timeout unless its ``X-Zswarm-Timeout`` header asks
    for another; past it the client gets 504 and the node stops working on it.

    ``cluster`` is the node's view of the cluster (the admin socket, see
    :class:`~zswarm.http.cluster.AdminCluster`); without it the ``/api/p2p`` routes answer 503
    and ``/metrics`` has only this process's HTTP series.

    ``bind_address`` (``host:port``, the node's --address) is where the server listens: on a
    loopback address every route refuses a foreign ``Host`` (access.py); elsewhere without API
    keys, the Swarm page warns that the API is open to the network. None (an app built by a
    test): neither. The token's own rule (API keys, else this machine only) holds either way.
    """
    keys = [k for k in api_keys if k]
    loopback = bind_address is not None and bound_to_loopback(bind_address)
    middleware: list[object] = [_NodeHeader(node_name)]
    if loopback:
        middleware.append(LoopbackHostOnly())
    if keys:
        middleware.append(_ApiKeys(keys))
    app = falcon.App(middleware=middleware)
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    registry, metrics = make_registry(cluster)
    app.add_route("/", Root())
    app.add_route("/healthz", _Health())
    app.add_route("/readyz", _Ready(backend))
    app.add_route("/metrics", MetricsResource(registry))
    app.add_route("/openapi.json", OpenApi())
    app.add_route("/swarm", Static(), suffix="page")
    app.add_route("/swarm/{asset}", Static())
    app.add_route("/v1/models", _Models(backend))
    app.add_route("/v1/models/{model_id}", _Models(backend), suffix="one")
    for path, kind in (("/v1/chat/completions", "chat"), ("/v1/completions", "completion")):
        app.add_route(path, _Completions(backend, kind, node_name, max_body_bytes, metrics, request_timeout_s))
    nodes = Nodes(cluster or NO_CLUSTER, open_to_network=bind_address is not None and not loopback and not keys)
    app.add_route("/api/p2p", nodes)
    app.add_route("/api/p2p/stats", nodes, suffix="stats")
    app.add_route("/api/p2p/token", TokenText(cluster or NO_CLUSTER, keys_set=bool(keys)))
    return app


class _NodeHeader:
    def __init__(self, node_name: str):
        self._node_name = node_name

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        if resp.get_header(NODE_HEADER) is None:
            resp.set_header(NODE_HEADER, self._node_name)


class _ApiKeys:
    """``Authorization: Bearer KEY`` (what OpenAI clients send) or ``x-api-key: KEY``."""

    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.path in PUBLIC_PATHS or req.path.startswith(PUBLIC_PREFIXES):
            return
        given = req.get_header("x-api-key") or ""
        scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
        if not given:
            raise ApiError(401, "You didn't provide an API key (Authorization: Bearer KEY).",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        # compare_digest against every key, so timing tells nothing about which key came close
        if not sum(hmac.compare_digest(given.encode(), k) for k in self._keys):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})


class _Health:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = b'{"status":"ok"}'
        resp.content_type = falcon.MEDIA_JSON


class _Ready:
    """Ready when a model can be served: this node's engine has one loaded, or a routable node has."""

    def __init__(self, backend: Backend):
        self._backend = backend

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            models = self._backend.models()
        except BackendUnavailable as e:
            body = {"status": "unready", "reason": f"the node is not available: {e}", "models": []}
        else:
            body = ({"status": "ready", "reason": "", "models": models} if models else
                    {"status": "unready", "reason": self._backend.problem() or
                     "no model is loaded and no node is routable", "models": []})
        resp.status = falcon.HTTP_200 if body["status"] == "ready" else falcon.HTTP_503
        resp.data = msgspec.json.encode(body)
        resp.content_type = falcon.MEDIA_JSON
        resp.cache_control = ["no-store"]


def _model_list(backend: Backend) -> list[str]:
    try:
        return backend.models()
    except BackendUnavailable as e:
        raise ApiError(503, f"The node is not available: {e}", code="node_unavailable",
                       headers=RETRY_LATER) from None


def _timeout(req: falcon.Request, default_s: float) -> float:
    """The request's timeout: its ``X-Zswarm-Timeout`` header (seconds), else ``default_s``."""
    raw = req.get_header(TIMEOUT_HEADER)
    if raw is None:
        return default_s
    try:
        return parse_seconds(raw.strip())
    except ConfigError as e:
        raise ApiError(400, f"{TIMEOUT_HEADER}: {e}", param=TIMEOUT_HEADER) from None


def _model_obj(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "zswarm"}


def _no_model(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


class _Models:
    def __init__(self, backend: Backend):
        self._backend = backend

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = msgspec.json.encode({"object": "list", "data": [_model_obj(m) for m in _model_list(self._backend)]})
        resp.content_type = falcon.MEDIA_JSON

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        if model_id not in _model_list(self._backend):
            raise _no_model(model_id)
        resp.data = msgspec.json.encode(_model_obj(model_id))
        resp.content_type = falcon.MEDIA_JSON


def _read_body(req: falcon.Request, limit: int) -> bytes:
    length = req.content_length  # a malformed Content-Length is Falcon's 400
    if length is not None and length > limit:
        raise ApiError(413, f"The request body is larger than {limit} bytes.")
    if length is None and req.env.get("wsgi.input_terminated"):
        stream = req.stream  # chunked upload; the server (gunicorn) ends the stream at the last chunk
    else:
        stream = req.bounded_stream  # never reads past Content-Length (absent: nothing)
    try:
        body = stream.read(limit + 1)
    except TimeoutError:  # the server's body deadline (zswarm/http/worker.py) passed
        # (gunicorn then closes the connection: the rest of the body cannot be drained in time)
        raise ApiError(408, "The request body did not arrive in time.", code="request_timeout") from None
    if len(body) > limit:
        raise ApiError(413, f"The request body is larger than {limit} bytes.")
    return body


def _sse(obj: object) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold events back


class _Completions:
    """POST /v1/chat/completions (kind "chat") and POST /v1/completions (kind "completion")."""

    def __init__(self, backend: Backend, kind: str, node_name: str, max_body_bytes: int,
                 metrics: HttpMetrics, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S):
        self._backend = backend
        self._timeout_s = timeout_s
        self._kind = kind
        self._node_name = node_name
        self._max_body_bytes = max_body_bytes
        self._metrics = metrics

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        track = self._metrics.track()
        try:
            self._post(req, resp, track)
        except falcon.HTTPError as e:
            track.end(e.status_code, _fail_node(e))
            raise
        except BaseException:
            track.end(500)
            raise
        # a whole answer was counted when it was built; a stream is counted when it ends

    def _post(self, req: falcon.Request, resp: falcon.Response, track: Track) -> None:
        timeout_s = _timeout(req, self._timeout_s)
        oreq = schema.parse(self._kind, _read_body(req, self._max_body_bytes))
        models = _model_list(self._backend)
        if oreq.model not in models and oreq.model not in self._backend.recent():
            # (a model served lately goes on to the node, which waits for it or answers a 503)
            problem = self._backend.problem()
            if problem and not models:  # this node should serve but cannot: say why
                raise ApiError(503, f"This node cannot serve: {problem}", code="engine_down",
                               headers=RETRY_LATER)
            raise _no_model(oreq.model)
        track.model = oreq.model
        request_id = uuid.uuid4().hex
        replies = schema.Replies(self._kind, request_id, oreq.model)
        try:
            items = iter(self._backend.generate(schema.to_gen_request(oreq, request_id, timeout_s)))
            # Until the first item, nothing is promised: a Fail now is an ordinary HTTP error.
            first = self._next(items, request_id, started=False)
        except BaseException:
            self._backend.cancel(request_id)
            raise
        if isinstance(first, wire.Fail):
            _close(items)
            raise from_fail(first, self._node_name)
        track.first_token()
        replies.node = getattr(first, "node", "")  # the engine's first chunk names its node
        if oreq.stream:
            stream = self._stream(items, first, replies, request_id, oreq.include_usage, track)
            next(stream)  # run to the first yield, so that close() always reaches the finally
            resp.stream = stream
            resp.content_type = "text/event-stream"
            resp.set_headers(_SSE_HEADERS)
            # the engine's first chunk names the serving node (wire.Chunk.node), so the headers,
            # which leave before the Done, name it too
            resp.set_header(NODE_HEADER, replies.node or self._node_name)
        else:
            self._whole(items, first, replies, request_id, resp, track)

    def _next(self, items: Iterator[Reply], request_id: str, started: bool) -> Reply:
        item = next(items, None)
        if isinstance(item, (wire.Chunk, wire.Done, wire.Fail)):
            return item
        # a broken backend: the Protocol promises replies only, ending with a terminal one
        log.error("request %s: the backend gave %r instead of a reply", request_id, type(item).__name__)
        self._backend.cancel(request_id)
        return wire.Fail(id=request_id, code="internal", message="The node ended the answer without a result.",
                         started=started)

    def _whole(self, items: Iterator[Reply], item: Reply, replies: schema.Replies, request_id: str,
               resp: falcon.Response, track: Track) -> None:
        texts: list[str] = []
        terminal = False
        try:
            while not isinstance(item, (wire.Done, wire.Fail)):
                texts.append(item.text)
                item = self._next(items, request_id, started=True)
            terminal = True
        finally:
            if not terminal:
                self._backend.cancel(request_id)
            _close(items)
        if isinstance(item, wire.Fail):
            raise from_fail(item, self._node_name)
        resp.data = msgspec.json.encode(replies.whole("".join(texts), item))
        resp.content_type = falcon.MEDIA_JSON
        resp.set_header(NODE_HEADER, item.node or self._node_name)
        track.end(200, item.node, item)

    def _stream(self, items: Iterator[Reply], item: Reply, replies: schema.Replies, request_id: str,
                include_usage: bool, track: Track) -> Iterator[bytes]:
        """The SSE body. Runs after Falcon has returned, so no Falcon error handler is above it."""
        terminal = False
        try:
            yield b""  # the priming point (see on_post); this value is never sent
            if replies.chat:
                yield _sse(replies.chunk(role=True))
            while True:
                if isinstance(item, wire.Chunk):
                    if item.text:
                        yield _sse(replies.chunk(item.text))
                elif isinstance(item, wire.Done):
                    terminal = True
                    track.end(200, item.node, item)
                    yield _sse(replies.chunk(finish_reason=item.finish_reason))
                    if include_usage:
                        yield _sse(replies.usage_chunk(item))
                    break
                else:
                    terminal = True
                    log.info("request %s failed after streaming began: %s", request_id, item.code)
                    # counted as the status a client without streaming would have seen
                    track.end(wire.FAIL_CODES.get(item.code, 500), item.node)
                    yield _sse(from_fail(item, self._node_name).body)
                    break
                item = self._next(items, request_id, started=True)
            yield _SSE_DONE
        except Exception:
            log.exception("streaming request %s failed", request_id)
            track.end(500)
            yield _sse(ApiError(500, "The server had an error while processing your request.", code="internal").body)
            yield _SSE_DONE
        finally:
            # GeneratorExit (the client went away) and any error above both land here
            if not terminal:
                self._backend.cancel(request_id)
            track.end(499)  # counts only when nothing above did: the client went away
            _close(items)


def _fail_node(e: falcon.HTTPError) -> str:
    """The node named by an error that came from a node's Fail ("" when none did)."""
    headers = e.headers or {}
    return headers.get(NODE_HEADER, "") if isinstance(headers, dict) else ""


def _close(items: Iterator[Reply]) -> None:
    close = getattr(items, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("closing a backend answer failed")
