"""The node's state directory: its stable id, the path of its sockets, and the lock that makes it one node's.

The directory is created with mode 0700 so the admin socket inside it is never reachable by
other users, even in the instant between bind and chmod. :meth:`StateDir.claim` takes an
exclusive ``flock`` on ``STATE/lock`` for the node's life: a second node started on the same
directory is refused with one line naming the first one's pid, before it binds or unlinks
anything (the sockets in the directory, which a node removes as "stale" at bind, belong to the
holder of the lock alone). The kernel drops the lock when the holder dies, even by SIGKILL.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .identity import Identity, IdentityError

ADMIN_SOCKET = "admin.sock"
LOCK_FILE = "lock"


class StateDirError(Exception):
    """The state directory cannot be this node's; one line for the user."""


class StateDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self._lock_fd: int | None = None

    def ensure(self) -> "StateDir":
        """Create the directory (mode 0700); raises StateDirError with the reason."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.path, 0o700)
        except OSError as e:
            raise StateDirError(self._why(e)) from None
        return self

    def claim(self) -> "StateDir":
        """Create the directory and hold its lock until the process ends (or :meth:`release`).

        Raises StateDirError if another live process holds it, or if the directory cannot be
        written (read-only, not a directory, not ours)."""
        self.ensure()
        path = self.path / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children (PEP 446)
        except OSError as e:
            raise StateDirError(self._why(e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise StateDirError(
                    f"another node{f' (pid {holder})' if holder.isdigit() else ''} is running with the state "
                    f"directory {self.path}: stop it, or give this one its own --state-dir") from None
            raise StateDirError(self._why(e)) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            os.close(fd)
            raise StateDirError(self._why(e)) from None
        self._lock_fd = fd
        return self

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
            self._lock_fd = None

    def _why(self, e: OSError) -> str:
        return (f"cannot use the state directory {self.path}: {e.strerror or e}"
                f"{f' ({e.filename})' if e.filename and str(e.filename) != str(self.path) else ''}; "
                f"give --state-dir a directory this user can write")

    def identity(self) -> Identity:
        """The node's key pair (identity.py), made on first start and kept across restarts, so
        peers see a restarted node as the same node; the node id is derived from it."""
        try:
            return Identity.load_or_create(self.path)
        except IdentityError as e:
            raise StateDirError(str(e)) from None

    def node_id(self) -> str:
        return self.identity().node_id

    def endpoint(self, name: str) -> str:
        """An ipc endpoint in the state directory (``gateway``, ``engine``...)."""
        return f"ipc://{self.path / (name + '.sock')}"

    @property
    def admin_socket(self) -> Path:
        return self.path / ADMIN_SOCKET

    @property
    def admin_endpoint(self) -> str:
        return "ipc://" + str(self.admin_socket)
