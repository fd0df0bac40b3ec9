"""A node's own identity: an Ed25519 key pair made on first start and kept in its state directory.

The node id is derived from the public key (the first 8 bytes of its SHA-256, in hex), so an id
cannot be claimed without the key: a record, beat or leave about node X is believed only when
X's key signed it (membership.py checks, wire.py carries the signatures). The node's CURVE key
pair (its transport key, as opposed to the token's, which every member shares) is derived from
the same seed (HKDF, its own label), so one 0600 file holds everything.

Pure apart from :meth:`Identity.load_or_create`, which reads and writes that one file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import zmq
import zmq.utils.z85
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_FILE = "identity.key"
SEED_BYTES = 32
PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64
_MAGIC = b"zswarm identity v1\n"


class IdentityError(ValueError):
    """The identity file cannot be used; one line, fit to show a user."""


def node_id_of(public: bytes) -> str:
    """The node id a public key stands for: 16 hex chars."""
    return hashlib.sha256(b"zswarm node id|" + public).hexdigest()[:16]


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Is ``signature`` ``public``'s over ``message``? Never raises on hostile input."""
    if len(public) != PUBLIC_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def seed_file(seed: bytes, magic: bytes) -> bytes:
    """A key file's bytes: a first line that says what it is, then the seed in hex."""
    return magic + seed.hex().encode() + b"\n"


def seed_in(data: bytes, magic: bytes) -> bytes:
    """The seed in a key file's bytes; ValueError("foreign") if it is not a ``magic`` file,
    ValueError("damaged") if the seed cannot be read."""
    if not data.startswith(magic):
        raise ValueError("foreign")
    try:
        seed = bytes.fromhex(data[len(magic):].decode().strip())
    except (UnicodeDecodeError, ValueError):
        seed = b""
    if len(seed) != SEED_BYTES:
        raise ValueError("damaged")
    return seed


@dataclass(frozen=True, eq=False)
class SigningKey:
    """An Ed25519 key from its 32-byte seed: a node's identity, or the operator's key (operator.py)."""

    seed: bytes

    @cached_property
    def _key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @cached_property
    def public(self) -> bytes:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


@dataclass(frozen=True, eq=False)
class Identity(SigningKey):

    @cached_property
    def node_id(self) -> str:
        return node_id_of(self.public)

    @cached_property
    def curve_secret(self) -> bytes:
        """The node's own CURVE secret key, Z85 (pyzmq's form)."""
        raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"zswarm identity", info=b"curve").derive(self.seed)
        # clamp through X25519 so the key is the one libzmq's Curve25519 will compute with
        raw = X25519PrivateKey.from_private_bytes(raw).private_bytes_raw()
        return zmq.utils.z85.encode(raw)

    @cached_property
    def curve_public(self) -> bytes:
        return zmq.curve_public(self.curve_secret)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(os.urandom(SEED_BYTES))

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike) -> "Identity":
        """The node's identity, made (mode 0600) on first start; the same ever after."""
        path = Path(state_dir) / KEY_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            ident = cls.generate()
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(seed_file(ident.seed, _MAGIC))
            os.replace(tmp, path)
            return ident
        except OSError as e:
            raise IdentityError(f"cannot read the node's identity {path}: {e.strerror}") from None
        try:
            seed = seed_in(data, _MAGIC)
        except ValueError as e:
            raise IdentityError(f"{path} is not a zswarm identity file" if str(e) == "foreign" else
                                f"{path} is damaged (move it away to give this node a new identity)") from None
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return cls(seed)
