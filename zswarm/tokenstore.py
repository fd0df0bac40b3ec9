"""What a node keeps of its cluster's rotations: ``STATE/cluster.json``, mode 0600.

After a rotation (rotation.py) the node's own configuration (``ZSWARM_TOKEN``, an env file, a
``--token-file``) still names the old token. The node keeps the current token here, with the
networks it replaced, so that a restart with the old token resumes with the current one (and
says so) instead of being cut off from its own cluster; a token of another cluster starts
afresh. It also keeps the last rotation statement (without its boxes): the revoked nodes stay
refused across restarts, and newcomers learn them from it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from . import wire
from .token import Token, TokenError

log = logging.getLogger(__name__)

FILE = "cluster.json"
MAX_SUPERSEDED = 64


@dataclass
class ClusterState:
    token: Token
    epoch: int = 0
    superseded: list[str] = field(default_factory=list)  # network ids this token replaced, oldest first
    rotation: wire.Rotation | None = None  # the last statement believed, without its boxes

    @property
    def revoked(self) -> list[wire.Revoked]:
        return list(self.rotation.revoked) if self.rotation is not None else []


def resolve(state_dir: str | os.PathLike, given: Token) -> tuple[ClusterState, str]:
    """The node's cluster state for the token it was given, and a line to log ("" if none)."""
    saved = _read(Path(state_dir) / FILE)
    net = given.derive().network_id
    if saved is None:
        return ClusterState(given), ""
    current = saved.token.derive().network_id
    if net == current:
        return saved, ""
    if net in saved.superseded:
        return saved, (f"the token this node was given was replaced by a rotation (zswarm admin rotate-token): "
                       f"using the current one, network {current}; `zswarm admin token` prints it")
    return ClusterState(given), ""  # another cluster: what was kept belongs to the old one


def save(state_dir: str | os.PathLike, cs: ClusterState) -> None:
    path = Path(state_dir) / FILE
    data = {"token": cs.token.encode(), "epoch": cs.epoch, "superseded": cs.superseded[-MAX_SUPERSEDED:],
            "rotation": base64.b64encode(msgspec.msgpack.encode(cs.rotation)).decode() if cs.rotation else ""}
    tmp = path.with_suffix(".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as e:
        log.error("cannot keep the cluster's new token in %s: %s (a restart with the old one will be cut off)",
                  path, e.strerror)


def _read(path: Path) -> ClusterState | None:
    try:
        data = json.loads(path.read_text())
        token = Token.parse(data["token"])
        rot = data.get("rotation") or ""
        rotation = msgspec.msgpack.decode(base64.b64decode(rot), type=wire.Rotation) if rot else None
        superseded = [s for s in data.get("superseded", []) if isinstance(s, str)]
        return ClusterState(token, int(data.get("epoch", 0)), superseded, rotation)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, TokenError, msgspec.MsgspecError) as e:
        log.warning("ignoring %s: %s", path, e)
        return None
