"""``GET /openapi.json``: the OpenAPI 3.1 description of every route of the HTTP app.

The request bodies are generated (``msgspec.json.schema_components``) from the very Structs
the app decodes them with (:data:`zswarm.http.schema.REQUESTS`), so a field added there is
documented here without an edit; their descriptions are those Structs' docstrings and ``Meta``.
Nothing here may patch a generated schema: what it should say belongs on the Struct.

Everything else is written by hand, on purpose. Replies are built as dicts (``schema.Replies``
on the streaming path, ``errors.error_body``, ``cluster.py``), so Structs for them would be a
second description that nothing encodes with: the drift would only move. And replies cannot
drift unseen: tests/test_openapi.py checks every route the app has against this document,
and schemathesis checks each answer's status, headers and body against these schemas. Requests
need the generation because nothing else would catch their drift: the app accepts fields the
document does not list, and schemathesis only sends what it lists.
"""

from __future__ import annotations

from typing import Any

import falcon
import msgspec

from .. import __version__
from ..config import DEFAULT_REQUEST_TIMEOUT_S, MAX_REQUEST_TIMEOUT_S
from . import schema
from .errors import NODE_HEADER, RETRY_AFTER_S, TIMEOUT_HEADER

JSON = "application/json"
_REF_TEMPLATE = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF_TEMPLATE.format(name=name)}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, **extra}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_STR = {"type": "string"}
_INT = {"type": "integer"}
_COUNT = {"type": "integer", "minimum": 0}
_NODE_HEADER = {NODE_HEADER: {"description": "Id of the node whose engine answered (or, when none did, "
                                             "the name of the node that took the request)",
                              "schema": _STR}}

_SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _obj({
        "message": _STR, "type": {"type": "string", "enum": ["invalid_request_error", "server_error"]},
        "param": _nullable(_STR), "code": _nullable(_STR)})}),
    "Model": _obj({"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR}),
    "ModelList": _obj({"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}),
    "Usage": _obj({"prompt_tokens": _COUNT, "completion_tokens": _COUNT, "total_tokens": _COUNT,
                   "prompt_tokens_details": _obj({"cached_tokens": _COUNT})}),
    "Ready": _obj({"status": {"type": "string", "enum": ["ready", "unready"]}, "reason": _STR,
                   "models": {"type": "array", "items": _STR}}),
    "Health": _obj({"status": {"const": "ok"}}),
    "Node": _obj({
        "id": _STR, "name": _STR,
        "role": {"type": "string", "enum": ["server", "federated", "worker"]},
        "self": {"type": "boolean", "description": "this is the node answering"},
        "state": {"type": "string", "enum": ["alive", "suspect", "dead"],
                  "description": "suspect after 2 s without news, dead after 4 s; removed 30 s later"},
        "online": {"type": "boolean", "description": "state is alive"},
        "last_seen_s": {"type": "number", "minimum": 0},
        "endpoints": {"type": "object", "additionalProperties": _STR},
        "models": {"type": "array", "items": _STR},
        "mem_total": {**_COUNT, "description": "bytes"},
        "mem_free": {**_COUNT, "description": "bytes"},
        "in_flight": _COUNT,
        "layers": {"anyOf": [_COUNT, {"type": "null"}],
                   "description": "layers of the answering node's model that this node holds, from the "
                                  "answering node's shard plan; null when unknown (this node holds none of "
                                  "its layers, or the engine has not reported them)"},
        "served": {**_COUNT, "description": "requests this node's gateway has routed to the node"},
        "flags": {"type": "array", "items": _STR},
        "software": _STR,
        "started_at": {"type": "number", "description": "unix seconds"},
        "held_by": {"anyOf": [_ref("Holder"), {"type": "null"}],
                    "description": "a worker: the server whose split it serves (a worker serves one server "
                                   "at a time); null when it is free, or for other roles"},
    }),
    "Holder": _obj({"id": _STR, "name": _STR, "self": {"type": "boolean", "description": "the answering node"},
                    "held": {"type": "boolean", "description": "false while the claim is still settling"}}),
    "RevokedNode": _obj({"id": _STR, "name": _STR, "at": {"type": "number", "description": "unix seconds"}}),
    "TakenWorker": _obj({"id": _STR, "name": _STR, "by": {**_STR, "description": "id of the server holding it"},
                         "by_name": _STR}),
    "SplitPart": _obj({"id": _STR, "name": _STR, "layers": _COUNT, "mem": {**_COUNT, "description": "bytes"},
                       "local": {"type": "boolean"}}),
    "Split": _obj({"model": _nullable(_STR), "n_layers": _COUNT,
                   "parts": {"type": "array", "items": _ref("SplitPart")},
                   "reshards": {**_COUNT, "description": "times the model was re-split since the node started"},
                   "error": _nullable({"type": "string", "description": "why the last split failed"})}),
    "Cluster": _obj({
        "node": _obj({"id": _STR, "name": _STR, "role": _STR, "network_id": _nullable(_STR),
                      "gossip": _nullable({"type": "string", "description": "HOST:PORT to pass as --bootstrap"}),
                      "software": _STR,
                      "open_to_network": {"type": "boolean", "description": "this server listens on a "
                                          "non-loopback address without API keys (the Swarm page warns)"}}),
        "federated": {"type": "array", "items": _ref("Node"),
                      "description": "servers started with --p2p --federated"},
        "workers": {"type": "array", "items": _ref("Node"), "description": "zswarm worker nodes"},
        "servers": {"type": "array", "items": _ref("Node"), "description": "other servers"},
        "balancers": {"type": "array", "items": _ref("Node"),
                      "description": "zswarm federated nodes (model-less entry points)"},
        "split": {"anyOf": [_ref("Split"), {"type": "null"}],
                  "description": "how this node's model is split across workers; null when it is not"},
        "taken": {"type": "array", "items": _ref("TakenWorker"),
                  "description": "workers this node's split leaves out because another server holds them"},
        "shard_note": _nullable({"type": "string", "description": "what that means for this node's model"}),
        "shard_error": _nullable({"type": "string", "description": "why this server's model cannot be placed "
                                  "(a memory shortfall names the missing MiB); null when it can"}),
        "waiting": {"type": "array", "items": _STR,
                    "description": "workers whose RPC servers are starting: the split waits for them (20 s at most)"},
        "revoked": {"type": "array", "items": _ref("RevokedNode"),
                    "description": "nodes the operator removed for good (zswarm admin revoke), newest first"},
        "updated_at": {"type": "number", "description": "unix seconds"},
    }),
    "Count": _obj({"online": _COUNT, "total": _COUNT}),
    # OpenAPI 3.1 reads the schema of an event stream as the schema of each event.
    "ServerSentEvent": _obj({
        "data": {"type": "string", "description": "a chunk object as JSON (chat.completion.chunk or "
                                                  "text_completion; one with usage last when stream_options."
                                                  "include_usage), an error object, then the text [DONE]"},
        "event": _STR, "id": _STR, "retry": _INT}, required=["data"]),
    "Stats": _obj({g: _ref("Count") for g in ("federated", "workers", "servers", "balancers", "all")}),
}

_FINISH = {"type": "string", "enum": ["stop", "length"]}
_HEAD = {"id": _STR, "created": _INT, "model": _STR}
_SCHEMAS["ChatCompletion"] = _obj({**_HEAD, "object": {"const": "chat.completion"}, "choices": {
    "type": "array", "items": _obj({"index": _INT, "message": _obj({"role": {"const": "assistant"}, "content": _STR,
                                                                   "refusal": {"type": "null"}}),
                                    "logprobs": {"type": "null"}, "finish_reason": _FINISH})},
    "usage": _ref("Usage")})
_SCHEMAS["TextCompletion"] = _obj({**_HEAD, "object": {"const": "text_completion"}, "choices": {
    "type": "array", "items": _obj({"index": _INT, "text": _STR, "logprobs": {"type": "null"},
                                    "finish_reason": _FINISH})},
    "usage": _ref("Usage")})

# The request bodies, generated; each kind's body is the Struct the app decodes it as.
_BODIES, _GENERATED = msgspec.json.schema_components(list(schema.REQUESTS.values()), ref_template=_REF_TEMPLATE)
_REQUEST_BODY = dict(zip(schema.REQUESTS, _BODIES))
if _SCHEMAS.keys() & _GENERATED.keys():
    raise RuntimeError(f"schemas both written and generated: {sorted(_SCHEMAS.keys() & _GENERATED.keys())}")
_SCHEMAS.update(_GENERATED)

_GUARDED = [{"bearer": []}, {"apiKey": []}, {}]  # a key only when the node has API keys
_PUBLIC: list = []
_401 = {"401": _error("An API key is required (the node has keys) or the one given is wrong")}
_RETRY_AFTER = {"Retry-After": {
    "description": f"Seconds to wait before trying again ({RETRY_AFTER_S}); OpenAI's clients wait that long "
                   "before they retry",
    "required": True, "schema": {"type": "integer", "minimum": 0}}}


def _unavailable(description: str) -> dict[str, Any]:
    """A 503 that waiting can cure: the app sends Retry-After with it (errors.RETRY_LATER)."""
    return {"503": {**_error(description), "headers": _RETRY_AFTER}}


_503 = _unavailable("The node is not available (code `node_unavailable`)")
_TIMEOUT = {
    "name": TIMEOUT_HEADER, "in": "header", "required": False,
    "description": "Seconds this request may take, queueing included (default: the node's --request-timeout, "
                   f"{DEFAULT_REQUEST_TIMEOUT_S:g} s unless it was set). Past them the node stops working on it "
                   "and the answer is a 504 with code `timeout`; once a stream has begun, an error event with "
                   "that code ends it instead.",
    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_REQUEST_TIMEOUT_S}, "example": 120}


def _completion(op_id: str, kind: str, reply: str, summary: str) -> dict[str, Any]:
    return {"post": {
        "operationId": op_id, "summary": summary, "security": _GUARDED, "tags": ["OpenAI"],
        "parameters": [_TIMEOUT],
        "requestBody": {"required": True, "content": {JSON: {"schema": _REQUEST_BODY[kind]}}},
        "responses": {
            "200": {"description": "The answer: whole (JSON), or as server-sent events with stream: true "
                                   "(data: chunk objects, then data: [DONE])",
                    "headers": _NODE_HEADER,
                    "content": {JSON: {"schema": _ref(reply)},
                                "text/event-stream": {"schema": _ref("ServerSentEvent")}}},
            "400": _error("The body is not valid JSON, breaks the schema, or does not fit the context; "
                          f"or {TIMEOUT_HEADER} is not a number of seconds in the range it allows"),
            **_401,
            "404": _error("No node serves this model"),
            "413": _error("The body is larger than the node accepts (1 MiB by default)"),
            **_unavailable("The node is not available: it is down or restarting (code `node_unavailable` or "
                           "`engine_down`), every slot is busy (`overloaded`), or no node serves the model "
                           "for now (`no_node`)"),
            "504": _error(f"The answer took longer than the request's timeout ({TIMEOUT_HEADER}, else the "
                          "node's --request-timeout): code `timeout`"),
        }}}


def _get(op_id: str, summary: str, responses: dict[str, Any], security: list, tag: str,
         parameters: list | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "security": security, "tags": [tag],
                          "responses": responses}
    if parameters:
        op["parameters"] = parameters
    return {"get": op}


_PATHS: dict[str, Any] = {
    "/": _get("root", "Redirects a browser to the Swarm page", {
        "302": {"description": "To /swarm", "headers": {"Location": {"schema": {"const": "/swarm"}}}}},
        _PUBLIC, "Page"),
    "/swarm": _get("swarmPage", "The Swarm page (HTML; no data in it, it fetches /api/p2p)", {
        "200": {"description": "The page", "content": {"text/html": {"schema": _STR}}}}, _PUBLIC, "Page"),
    "/swarm/{asset}": _get("swarmAsset", "The Swarm page's script and style sheet", {
        "200": {"description": "The file", "content": {"text/html": {"schema": _STR},
                                                       "text/javascript": {"schema": _STR},
                                                       "text/css": {"schema": _STR}}},
        "404": _error("No such file")}, _PUBLIC, "Page",
        [{"name": "asset", "in": "path", "required": True,
          "schema": {"type": "string", "enum": ["swarm.html", "swarm.js", "swarm.css"]}}]),
    "/healthz": _get("healthz", "The HTTP process is alive", {"200": _json(_ref("Health"), "Alive")},
                     _PUBLIC, "Health"),
    "/readyz": _get("readyz", "Ready: a model is loaded here, or at least one node is routable", {
        "200": _json(_ref("Ready"), "Ready"), "503": _json(_ref("Ready"), "Not ready, with the reason")},
        _PUBLIC, "Health"),
    "/metrics": _get("metrics", "Prometheus metrics (text format 0.0.4)", {
        "200": {"description": "The metrics", "content": {"text/plain": {"schema": _STR}}}, **_401},
        _GUARDED, "Health"),
    "/openapi.json": _get("openapi", "This document", {
        "200": _json({"type": "object"}, "OpenAPI 3.1")}, _PUBLIC, "Health"),
    "/v1/models": _get("listModels", "Models servable through this node", {
        "200": _json(_ref("ModelList"), "The models"), **_401, **_503}, _GUARDED, "OpenAI"),
    "/v1/models/{model_id}": _get("getModel", "One model", {
        "200": _json(_ref("Model"), "The model"), **_401, "404": _error("No node serves this model"), **_503},
        _GUARDED, "OpenAI", [{"name": "model_id", "in": "path", "required": True, "schema": _STR}]),
    "/v1/chat/completions": _completion("createChatCompletion", "chat", "ChatCompletion", "A chat completion"),
    "/v1/completions": _completion("createCompletion", "completion", "TextCompletion", "A text completion"),
    "/api/p2p": _get("clusterNodes", "Every node this node knows, by group", {
        "200": _json(_ref("Cluster"), "The nodes"), **_401,
        "503": _error("The node's admin socket did not answer")}, _GUARDED, "Cluster"),
    "/api/p2p/stats": _get("clusterStats", "Online and total nodes per group", {
        "200": _json(_ref("Stats"), "The counts"), **_401,
        "503": _error("The node's admin socket did not answer")}, _GUARDED, "Cluster"),
    "/api/p2p/token": _get("clusterToken", "The cluster token, as text", {
        "200": {"description": "The token", "content": {"text/plain": {"schema": {"type": "string",
                                                                                   "pattern": "^zs1"}}}},
        **_401, "403": _error("The node has no API keys and the request is not from this machine to a "
                              "loopback address (get the token with `zswarm admin token`)"),
        "404": _error("The node is in no cluster"),
        "503": _error("The node's admin socket did not answer")}, _GUARDED, "Cluster"),
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "zswarm", "version": __version__,
             "description": "The HTTP API of one zswarm node: OpenAI-compatible completions routed across the "
                            "cluster, the cluster's nodes, health and metrics."},
    "paths": _PATHS,
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "One of the node's API keys"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        },
    },
}


class OpenApi:
    """GET /openapi.json."""

    def __init__(self) -> None:
        self._data = msgspec.json.encode(DOCUMENT)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._data
        resp.content_type = falcon.MEDIA_JSON
