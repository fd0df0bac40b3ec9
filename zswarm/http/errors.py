"""Every error the HTTP app answers, in OpenAI's shape ``{"error": {message, type, param, code}}``.

OpenAI clients read ``error.message`` and ``error.code`` and branch on the HTTP status, so every
path out of the app, Falcon's own 404/405 included, goes through :func:`serialize_error`. The
catch-all :func:`handle_unexpected` keeps tracebacks in the log and out of responses.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon
import msgspec

from .. import wire

log = logging.getLogger(__name__)

NODE_HEADER = "X-Zswarm-Node"
TIMEOUT_HEADER = "X-Zswarm-Timeout"  # a completion's timeout in seconds (app.py reads it)
# On a 503 that a retry can cure (a restart, no route for a moment, every slot busy): OpenAI's
# clients retry 5xx answers and wait what Retry-After says (seconds) before they do.
RETRY_AFTER_S = 1
RETRY_LATER = {"Retry-After": str(RETRY_AFTER_S)}

# Statuses Python's http module does not know; Falcon would send "499 Unknown".
_REASONS = {499: "Client Closed Request"}


def status_line(status: int) -> str:
    if status in _REASONS:
        return f"{status} {_REASONS[status]}"
    return falcon.code_to_http_status(status)


def error_type(status: int) -> str:
    """OpenAI's ``type`` for a status: the client's fault (401 included, as OpenAI does) or ours."""
    return "invalid_request_error" if status < 500 else "server_error"


class ApiError(falcon.HTTPError):
    """An error answer; raise it anywhere in a responder or middleware."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, node: str = "", headers: dict[str, str] | None = None):
        headers = dict(headers or {})
        if node:
            headers[NODE_HEADER] = node
        super().__init__(status_line(status), description=message, headers=headers or None)
        self.body = error_body(status, message, type=type, param=param, code=code)


def error_body(status: int, message: str, *, type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or error_type(status), "param": param, "code": code}}


def from_fail(fail: wire.Fail, node_name: str) -> ApiError:
    """The HTTP answer to a Fail that came before anything was sent to the client."""
    status = wire.FAIL_CODES.get(fail.code, 500)
    return ApiError(status, fail.message or fail.code, code=fail.code, node=fail.node or node_name,
                    headers=RETRY_LATER if status == 503 else None)


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """Falcon's error serializer: JSON in OpenAI's shape, whatever the client said it accepts."""
    if isinstance(exc, ApiError):
        body = exc.body
    else:  # raised by Falcon itself: no route, wrong method, a malformed header...
        status = exc.status_code
        if status == 404:
            message = f"Invalid URL ({req.method} {req.path})"
        elif status == 405:
            message = f"Method {req.method} is not allowed on {req.path}"
        else:
            message = exc.description or exc.title or "error"
        body = error_body(status, message)
    resp.data = msgspec.json.encode(body)
    resp.content_type = falcon.MEDIA_JSON


def handle_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    """Last resort for any exception a responder let escape: log it, answer a bare 500."""
    if isinstance(ex, (falcon.HTTPError, falcon.HTTPStatus)):
        raise ex  # Falcon's own handlers were shadowed by this one; give it back to them
    log.exception("unhandled error on %s %s", req.method, req.path)
    raise ApiError(500, "The server had an error while processing your request.", code="internal")
