"""The operator's key: an Ed25519 key pair made with the token, whose public half the token carries.

Only its holder can revoke a machine or move the cluster to a new token (rotation.py): a member
knows the token, not this key. ``zswarm token new`` and a first server that generates its token
write it to a file of mode 0600: ``~/.config/zswarm/operator-<fingerprint>.key`` by default
(``--operator-key FILE`` names another), the server's state directory for a generated token;
``zswarm admin revoke`` looks in both.

Nothing here logs or prints the key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .identity import SEED_BYTES, SigningKey, seed_file, seed_in

_MAGIC = b"zswarm operator key v1\n"


class OperatorKeyError(ValueError):
    """The operator key cannot be used; one line, fit to show a user."""


def fingerprint(public: bytes) -> str:
    """A short name for an operator public key: 16 hex chars, safe to show."""
    return hashlib.sha256(b"zswarm operator|" + public).hexdigest()[:16]


def default_path(public: bytes) -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "zswarm" / f"operator-{fingerprint(public)}.key"


def generated_key_path(state_dir: str | os.PathLike, public: bytes) -> Path:
    """Where a first server that generates its token keeps the key: its state directory."""
    return Path(state_dir).expanduser() / f"operator-{fingerprint(public)}.key"


def candidate_paths(public: bytes, state_dir: str | os.PathLike) -> list[Path]:
    """Where ``zswarm admin revoke`` looks for the key, without ``--operator-key``."""
    return [default_path(public), generated_key_path(state_dir, public)]


@dataclass(frozen=True, eq=False)
class OperatorKey(SigningKey):
    """The operator's key (SigningKey: seed, public, sign), kept in a file of its own."""

    @classmethod
    def generate(cls) -> "OperatorKey":
        return cls(os.urandom(SEED_BYTES))

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the key (mode 0600, its directory 0700 if made here); never over another file."""
        path = Path(path) if path else default_path(self.public)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise OperatorKeyError(f"{path} exists already: give --operator-key another file") from None
        except OSError as e:
            raise OperatorKeyError(f"cannot write the operator key to {path}: {e.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(seed_file(self.seed, _MAGIC))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OperatorKey":
        path = Path(path).expanduser()
        try:
            data = path.read_bytes()[:4096]
        except FileNotFoundError:
            raise OperatorKeyError(f"no operator key at {path} (give the file with --operator-key)") from None
        except OSError as e:
            raise OperatorKeyError(f"cannot read the operator key {path}: {e.strerror}") from None
        try:
            return cls(seed_in(data, _MAGIC))
        except ValueError as e:
            raise OperatorKeyError(f"{path} is not a zswarm operator key" if str(e) == "foreign" else
                                   f"{path} is damaged") from None
