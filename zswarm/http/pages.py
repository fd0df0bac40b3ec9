"""The Swarm page: ``/swarm`` and its script and style sheet, plain files shipped in the package.

No build step and nothing from another origin (the Content-Security-Policy forbids it), so the
page works on a machine with no Internet access. The files hold no data: the page's script asks
``/api/p2p`` and ``/api/p2p/token`` for everything, with the API key the operator types in when
the node has keys, which is why these routes are public and those are not.
"""

from __future__ import annotations

import importlib.resources

import falcon

from .errors import ApiError

ASSETS = {  # name -> content type; nothing else under static/ is served
    "swarm.html": "text/html; charset=utf-8",
    "swarm.js": "text/javascript; charset=utf-8",
    "swarm.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Cache-Control": "no-cache",  # revalidate, so a node upgrade never leaves an old script running
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _read(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath("static", name).read_bytes()


class Static:
    """GET /swarm (the page) and GET /swarm/{asset}; files are read once, at first use."""

    def __init__(self) -> None:
        self._cache: dict[str, bytes] = {}

    def _send(self, resp: falcon.Response, name: str) -> None:
        data = self._cache.get(name)
        if data is None:
            data = self._cache[name] = _read(name)
        resp.data = data
        resp.content_type = ASSETS[name]
        resp.set_headers(HEADERS)

    def on_get_page(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._send(resp, "swarm.html")

    def on_get(self, req: falcon.Request, resp: falcon.Response, asset: str) -> None:
        if asset not in ASSETS:
            raise ApiError(404, f"Invalid URL (GET {req.path})")
        self._send(resp, asset)


class Root:
    """GET /: a browser pointed at the node lands on the Swarm page."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise falcon.HTTPFound("/swarm")
