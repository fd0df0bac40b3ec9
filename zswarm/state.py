"""The node's state directory: its stable id and the path of its admin socket.

The directory is created with mode 0700 so the admin socket inside it is never reachable by
other users, even in the instant between bind and chmod.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

ID_FILE = "node_id"
ADMIN_SOCKET = "admin.sock"


class StateDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()

    def ensure(self) -> "StateDir":
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)
        return self

    def node_id(self) -> str:
        """The id kept across restarts, so peers see a restarted node as the same node."""
        f = self.path / ID_FILE
        try:
            text = f.read_text().strip()
            if len(text) == 16 and all(c in "0123456789abcdef" for c in text):
                return text
        except FileNotFoundError:
            pass
        node_id = secrets.token_hex(8)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(node_id + "\n")
        os.replace(tmp, f)
        return node_id

    def endpoint(self, name: str) -> str:
        """An ipc endpoint in the state directory (``gateway``, ``engine``...)."""
        return f"ipc://{self.path / (name + '.sock')}"

    @property
    def admin_socket(self) -> Path:
        return self.path / ADMIN_SOCKET

    @property
    def admin_endpoint(self) -> str:
        return "ipc://" + str(self.admin_socket)
