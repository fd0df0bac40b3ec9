"""Who may reach the app and the cluster token: the ``Host`` check of a loopback bind, and the
token's rule when the node has no API keys.

- **A server bound to a loopback address** (127.0.0.1, ::1, localhost) answers only requests
  whose ``Host`` names a loopback address or name. A web page on another origin can make this
  machine's browser send requests to 127.0.0.1 by DNS rebinding (its own name, re-pointed at
  127.0.0.1), but the browser then still sends that name as ``Host``: those requests get
  ``421 Misdirected Request`` on every route, health checks included (RFC 9110 §15.5.20: "a
  server that is not able to produce a response for the target URI"). A request without
  ``Host`` (HTTP/1.0) is no browser's and passes.
- **The token without API keys** goes only to a client on this machine (its address is a
  loopback one) that also named a loopback ``Host``; anyone else gets 403 saying how to get
  the token: ``zswarm admin token`` on the node's machine, or API keys. With API keys, the
  key check (app.py) guards the token like every other cluster route.

A reverse proxy on the same machine makes every client look local: give such a node API keys.
"""

from __future__ import annotations

import ipaddress

import falcon

from ..config import is_loopback
from .errors import ApiError

TOKEN_REFUSED = (
    "The cluster token is given over HTTP only to a client on the node's own machine (a request "
    "to 127.0.0.1 or localhost) while the node has no API keys. Get it with `zswarm admin token` "
    "on the node's machine, or start the node with API keys (--api-key) and send one "
    "(Authorization: Bearer KEY).")


def host_of(authority: str) -> str:
    """The host part of ``host[:port]``, ``[v6]:port`` or ``[v6]``; lower case, no final dot."""
    authority = authority.strip()
    if authority.startswith("["):
        host = authority[1:].split("]", 1)[0]
    elif authority.count(":") == 1:
        host = authority.split(":", 1)[0]
    else:
        host = authority  # a bare name, or a (malformed) unbracketed IPv6 address
    return host.lower().rstrip(".")


def loopback_host(authority: str | None) -> bool:
    """Does a ``Host`` value name this machine only: localhost, *.localhost (RFC 6761: resolved to
    loopback, never by DNS), 127.0.0.0/8 or ::1, with any port?"""
    if not authority:
        return False
    host = host_of(authority)
    return host.endswith(".localhost") or loopback_address(host)


def loopback_address(addr: str | None) -> bool:
    """Is ``addr`` a loopback address (an IPv4-mapped IPv6 one included) or "localhost"?"""
    if not addr:
        return False
    if is_loopback(addr):
        return True
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(mapped and mapped.is_loopback)


def bound_to_loopback(bind_address: str) -> bool:
    """Is ``host:port`` (the node's --address) a loopback address?"""
    return loopback_address(host_of(bind_address))


class LoopbackHostOnly:
    """Middleware for a loopback bind: a request naming a foreign ``Host`` gets 421 (see above)."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        host = req.get_header("Host")
        if host is not None and not loopback_host(host):
            raise ApiError(421, "This server answers only requests addressed to localhost or a "
                           f"loopback address, not to {host_of(host)[:100]!r}.", code="misdirected_request")


def check_token_access(req: falcon.Request, keys_set: bool) -> None:
    """Raise the 403 unless ``req`` may have the token (with keys: the key check passed already)."""
    if keys_set:
        return
    # REMOTE_ADDR itself: falcon's remote_addr says 127.0.0.1 when the server set none
    if not (loopback_address(req.env.get("REMOTE_ADDR")) and loopback_host(req.get_header("Host"))):
        raise ApiError(403, TOKEN_REFUSED, code="token_forbidden")
