"""The operator's side of ``zswarm admin revoke NODE_ID`` and ``zswarm admin rotate-token``.

Runs in the operator's process, next to a running node (its admin socket): asks the node for the
current token, the members' keys and who is revoked already, makes the statement with the
operator key (rotation.py) and hands it to the node, which checks it like any other and floods
it through the cluster. The operator key never leaves this process.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import msgspec

from . import rotation, wire
from .admin_client import call
from .operator import OperatorKey, OperatorKeyError, candidate_paths, default_path
from .token import Token


class RevokeError(RuntimeError):
    """One line for the operator."""


def operator_key(path: str | None, token: Token, state_dir: str) -> OperatorKey:
    if not token.operator:
        raise RevokeError("this cluster's token has no operator key (it was made before zswarm could revoke): "
                          "only a cluster started with a token from `zswarm token new` can revoke")
    if path is None:
        found = [p for p in candidate_paths(token.operator, state_dir) if p.exists()]
        if not found:
            raise RevokeError(f"no operator key for this cluster in {default_path(token.operator).parent} or "
                              f"{state_dir}: give it with --operator-key FILE")
        path = str(found[0])
    try:
        key = OperatorKey.load(path)
    except OperatorKeyError as e:
        raise RevokeError(str(e)) from None
    if key.public != token.operator:
        raise RevokeError(f"{path} is not this cluster's operator key")
    return key


def rotate(state_dir: str, revoke_ids: list[str], key_path: str | None, timeout_s: float) -> dict[str, Any]:
    """Revoke ``revoke_ids`` (none: only a new token) and move the cluster to a new token."""
    info = call(state_dir, "rotation_info", timeout_s=timeout_s)
    token = Token.parse(info["token"])
    key = operator_key(key_path, token, state_dir)
    by_id = {m["id"]: m for m in info["members"]}
    revoked_before = [wire.Revoked(r["id"], bytes.fromhex(r["key"]), r["curve"], r["name"], r["at"])
                      for r in info["revoked"]]
    now = time.time()
    revoke = []
    for node_id in revoke_ids:
        named = [m for m in info["members"] if m["name"] == node_id]
        if node_id not in by_id and len(named) > 1:
            raise RevokeError(f"{len(named)} nodes are called {node_id!r}: name one by its id "
                              f"({', '.join(m['id'] for m in named)})")
        m = by_id.get(node_id) or (named[0] if named else None)
        if m is None:
            if any(r.id == node_id for r in revoked_before):
                raise RevokeError(f"node {node_id} is revoked already")
            raise RevokeError(f"no node {node_id!r} is known to this node (see `zswarm admin peers`)")
        if m["state"] == "self":
            raise RevokeError(f"node {node_id} is the node this command talks to: run it on another member")
        shared = [o["id"] for o in info["members"] if o["curve"] == m["curve"] and o["id"] != m["id"]]
        if shared:  # its key would be refused for them too
            raise RevokeError(f"node {m['id']} announces the transport key of {', '.join(shared)}: revoke "
                              "those too, or look into it before revoking")
        revoke.append(wire.Revoked(m["id"], bytes.fromhex(m["key"]), m["curve"], m["name"], now))
    members = [rotation.Member(m["id"], m["curve"]) for m in info["members"]]
    try:
        rot, _new = rotation.make(key, token, members, revoked_before, revoke, info["epoch"], now)
    except rotation.RotationError as e:
        raise RevokeError(str(e)) from None
    statement = base64.b64encode(msgspec.msgpack.encode(rot)).decode()
    result = call(state_dir, "rotate", {"statement": statement}, timeout_s=timeout_s)
    left_out = sorted(set(by_id) - {r.id for r in rot.revoked} - {b.id for b in rot.boxes})
    return {**result, "revoked_now": [r.id for r in revoke], "left_out": left_out}
