"""Admin actor: the operator's socket, an ipc ROUTER in the state directory (mode 0600).

Requests and replies are JSON (:class:`zswarm.wire.AdminRequest` / ``AdminReply``). Each command
is a method ``cmd_<name>`` whose docstring is its help; errors carry a number from
:data:`ERRORS`. A request that cannot be read gets error 2 and nothing else happens.

``status`` also says which actors run and which failed (the node's :class:`~.base.Watch`). If
the Admin actor itself dies, nobody could ask that any more, so the node stops (``node.py``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Callable

import pykka
import zmq

from .. import __version__, wire
from ..transport import SocketLoop, Stats, bind_private_ipc
from .base import GuardedActor, Watch
from .listener import tell

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 2.0

ERRORS = {
    1: "unknown command",
    2: "malformed request",
    3: "bad arguments",
    4: "the node could not answer in time",
}


class AdminCommandError(Exception):
    def __init__(self, code: int, message: str = ""):
        super().__init__(message or ERRORS[code])
        self.code = code


class AdminActor(GuardedActor):
    name = "admin"

    def __init__(self, ctx: zmq.Context, endpoint: str, socket_path: str, node: dict[str, Any],
                 own: wire.NodeRecord, ledger: Any, discovery: Any, stats: Stats,
                 gateway: Any = None, supervisor: Any = None, token: str = "", watch: Watch | None = None):
        super().__init__(watch)
        self._token = token  # the cluster token ("" outside any cluster); only cmd_token reveals it
        self._api_keys: tuple[str, ...] = ()  # the HTTP API's keys; only cmd_api_keys reveals them
        self._own = own  # used when there is no ledger (a node outside any cluster)
        self._gateway = gateway
        self._supervisor = supervisor
        self._ctx = ctx
        self._endpoint = endpoint
        self._path = socket_path
        self._node = node  # static facts: id, role, network id, started_at
        self._ledger = ledger
        self._discovery = discovery
        self._stats = stats
        self._loop: SocketLoop | None = None
        self._extra: dict[str, Callable[..., Any]] = {}
        self._status_parts: dict[str, Callable[[], Any]] = {}

    def open(self) -> None:
        loop = SocketLoop("admin-io", self._ctx, self._setup)
        loop.start_and_wait()
        self._loop = loop

    def register_status(self, key: str, fn: Callable[[], Any]) -> None:
        """Add ``key: fn()`` to every ``status`` answer (e.g. the shard plan, the RPC server)."""
        self._status_parts[key] = fn

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        """Let a later actor (RPCSupervisor, Gateway) add a command; ``fn``'s docstring is its help."""
        self._extra[name] = fn

    # --- socket thread ---
    def _setup(self, loop: SocketLoop) -> None:
        self._sock = bind_private_ipc(loop.socket(zmq.ROUTER, self._on_frames), self._endpoint)

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self._stats.inc("admin_bad_frames")
            return
        tell(self.actor_ref, frames)  # the actor may be stopping: then nobody answers

    def _reply(self, ident: bytes, reply: wire.AdminReply) -> None:
        payload = wire.encode_json(reply)

        def _out() -> None:
            try:
                self._sock.send_multipart([ident, payload], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the client went away
        if self._loop is not None:
            self._loop.submit(_out)

    # --- actor thread ---
    def handle(self, message: Any) -> None:
        ident, payload = message
        try:
            req = wire.decode_admin_request(payload)
        except wire.BadFrame as e:
            self._reply(ident, wire.AdminReply(0, False, error=wire.AdminError(2, f"{ERRORS[2]}: {e}")))
            return
        try:
            result = self.run_command(req.command, req.args)
            reply = wire.AdminReply(req.id, True, result=result)
        except AdminCommandError as e:
            reply = wire.AdminReply(req.id, False, error=wire.AdminError(e.code, str(e)))
        except pykka.Timeout:
            reply = wire.AdminReply(req.id, False, error=wire.AdminError(4, ERRORS[4]))
        except Exception as e:  # a bug must not take the admin socket down with it
            self.failed(f"admin command {req.command!r}")  # logged with its traceback, counted
            reply = wire.AdminReply(req.id, False, error=wire.AdminError(3, f"{type(e).__name__}: {e}"))
        self._reply(ident, reply)

    def run_command(self, name: str, args: dict[str, Any]) -> Any:
        fn = self._extra.get(name)
        if fn is None and re.fullmatch(r"[a-z][a-z0-9_-]{0,40}", name):
            fn = getattr(self, "cmd_" + name.replace("-", "_"), None)
        if fn is None:
            raise AdminCommandError(1, f"unknown command {name!r}; try 'help'")
        try:
            return fn(**args)
        except TypeError as e:
            raise AdminCommandError(3, str(e)) from None

    def cmd_help(self) -> dict[str, str]:
        """List the commands and what they do."""
        names = sorted(n[4:] for n in dir(self) if n.startswith("cmd_")) + sorted(self._extra)
        out = {}
        for n in names:
            fn = getattr(self, "cmd_" + n, None) or self._extra[n]
            out[n] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        return out

    def cmd_status(self) -> dict[str, Any]:
        """This node: id, role, endpoints, peers by state, actors, counters."""
        # An actor that died answers None here (failed_actors says why), while the node stops
        own = self._ask(self._ledger, "own") or self._own
        peers = self._ask(self._ledger, "peers") or []
        by_state: dict[str, int] = {}
        for p in peers:
            by_state[p["state"]] = by_state.get(p["state"], 0) + 1
        return {
            **self._node,
            "name": own.name,
            "incarnation": own.incarnation,
            "software": __version__,
            "uptime_s": round(time.time() - own.started_at, 1),
            "endpoints": own.endpoints,
            "peers": by_state,
            "discovery": self._ask(self._discovery, "status"),
            "gateway": self._ask(self._gateway, "status"),
            "children": self._ask(self._supervisor, "status"),
            "revoked": self._ask(self._ledger, "revoked") or [],
            **{key: _unless_dead(fn) for key, fn in self._status_parts.items()},
            **self._watch.status(),  # actors: name -> running or failed; failed_actors: what the node did
            "counters": self._stats.snapshot(),
        }

    @staticmethod
    def _ask(proxy: Any, method: str) -> Any:
        """``proxy.method()``, waited for (ASK_TIMEOUT_S); None without that actor, or once it died."""
        return None if proxy is None else _unless_dead(lambda: getattr(proxy, method)().get(timeout=ASK_TIMEOUT_S))

    def cmd_token(self) -> str:
        """The cluster token ("" when the node is in no cluster); the Swarm page shows it."""
        return self._token

    def set_token(self, token: str) -> None:
        """The node: the cluster moved to a new token (rotation.py)."""
        from ..token import Token

        self._token = token
        self._node = {**self._node, "network_id": Token.parse(token).derive().network_id}

    def cmd_rotation_info(self) -> dict[str, Any]:
        """What `zswarm admin revoke` and `rotate-token` need: the token, the members' keys, the revoked."""
        if self._ledger is None:
            raise AdminCommandError(3, "this node is in no cluster")
        return self._ledger.rotation_info().get(timeout=ASK_TIMEOUT_S)

    def cmd_rotate(self, statement: str = "") -> dict[str, Any]:
        """Apply the operator's signed rotation (made by `zswarm admin revoke` / `rotate-token`)."""
        import base64
        import binascii

        if self._ledger is None:
            raise AdminCommandError(3, "this node is in no cluster")
        try:
            raw = base64.b64decode(statement, validate=True)
        except (binascii.Error, ValueError):
            raise AdminCommandError(3, "statement: not base64") from None
        try:
            return self._ledger.rotate(raw).get(timeout=ASK_TIMEOUT_S)
        except ValueError as e:
            raise AdminCommandError(3, str(e)) from None

    def cmd_revoked(self) -> list[dict]:
        """The nodes the operator revoked: id, name, when."""
        return self._ledger.revoked().get(timeout=ASK_TIMEOUT_S) if self._ledger else []

    def set_api_keys(self, keys: tuple[str, ...]) -> None:
        """The node, before it starts its HTTP server: the keys that server must ask for."""
        self._api_keys = tuple(keys)

    def cmd_api_keys(self) -> list[str]:
        """The HTTP API's keys; the node's HTTP server reads them here at start (never from its environment)."""
        return list(self._api_keys)

    def cmd_peers(self) -> list[dict]:
        """Every peer this node knows, with its state (alive, suspect, dead)."""
        return self._ledger.peers().get(timeout=ASK_TIMEOUT_S) if self._ledger else []

    def cmd_ledger(self) -> list[dict]:
        """The full replicated records, this node's own first."""
        import msgspec

        records = self._ledger.records().get(timeout=ASK_TIMEOUT_S) if self._ledger else [self._own]
        return msgspec.to_builtins(records)

    def cmd_log_level(self, level: str = "") -> str:
        """Show or set the log level (debug, info, warning, error)."""
        root = logging.getLogger()
        if level:
            value = logging.getLevelName(level.upper())
            if not isinstance(value, int):
                raise AdminCommandError(3, f"unknown level {level!r}")
            root.setLevel(value)
        return logging.getLevelName(root.level).lower()

    def release(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        try:
            os.unlink(self._path)
        except OSError:
            pass


def _unless_dead(fn: Callable[[], Any]) -> Any:
    """``fn()``, or None if the actor it asks has died."""
    try:
        return fn()
    except pykka.ActorDeadError:
        return None
