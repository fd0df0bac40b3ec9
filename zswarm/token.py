"""The cluster token: its text format and the keys derived from it.

A token is ``zs1`` followed by base64url (no padding) of::

    version (1 byte) | secret (32 bytes) | [operator key (32 bytes), version 2] | msgpack list of bootstrap "host:port" | checksum (4 bytes)

Version 2 carries the operator's Ed25519 public key (operator.py): only the holder of its
private half can revoke a machine or move the cluster to a new token (rotation.py). Version 1
tokens (no operator) still work; such a cluster cannot revoke.

The checksum (first 4 bytes of SHA-256 over everything before it) turns a truncated or
mistyped token into a clear error instead of a node that silently joins nothing.

Everything secret is derived from the 32-byte secret with HKDF-SHA256, one ``info`` label per
use, so no key is ever used for two purposes. This module never logs and never prints the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass

import msgspec
import zmq
import zmq.utils.z85
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "zs1"
VERSION = 2  # what new tokens are; 1 (no operator key) is still read
READS = (1, 2)
OPERATOR_BYTES = 32
SECRET_BYTES = 32
CHECKSUM_BYTES = 4
_SALT = b"zswarm token v1"


class TokenError(ValueError):
    """A token that cannot be used; the message is one line, fit to show a user."""


@dataclass(frozen=True)
class Keys:
    """What a node needs from the token. ``curve_*`` are Z85-encoded, as pyzmq expects."""

    curve_public: bytes
    curve_secret: bytes
    network_id: str  # 16 hex chars; safe to show and to log
    discovery_key: bytes  # HMAC-SHA256 key that signs mDNS announcements


@dataclass(frozen=True)
class Token:
    secret: bytes
    bootstrap: tuple[str, ...] = ()
    operator: bytes = b""  # the operator's Ed25519 public key; b"": nobody may revoke (a version 1 token)

    @classmethod
    def generate(cls, bootstrap: tuple[str, ...] | list[str] = (), operator: bytes = b"") -> "Token":
        return cls(os.urandom(SECRET_BYTES), tuple(validate_endpoint(b) for b in bootstrap), operator)

    def successor(self) -> "Token":
        """A new token for the same cluster: a new secret, the same operator and bootstrap."""
        return Token(os.urandom(SECRET_BYTES), self.bootstrap, self.operator)

    @classmethod
    def parse(cls, text: str) -> "Token":
        text = (text or "").strip()
        if not text:
            raise TokenError("the token is empty")
        if not text.startswith(PREFIX):
            if _is_localai_token(text):
                raise TokenError("this is a LocalAI token: zswarm cannot join a LocalAI network (LocalAI's "
                                 "nodes speak libp2p), nor reuse its keys; run `zswarm token new` and give "
                                 "the new token to every machine of the cluster")
            raise TokenError(f"not a zswarm token (it should start with {PREFIX!r})")
        body = text[len(PREFIX):]
        try:
            # validate=True: the lenient default silently skips characters that are not base64
            raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise TokenError("the token is not valid base64url: was it copied whole?") from None
        if len(raw) < 1 + SECRET_BYTES + CHECKSUM_BYTES:
            raise TokenError("the token is too short: was it copied whole?")
        payload, checksum = raw[:-CHECKSUM_BYTES], raw[-CHECKSUM_BYTES:]
        if hashlib.sha256(payload).digest()[:CHECKSUM_BYTES] != checksum:
            raise TokenError("the token's checksum does not match: it is truncated or mistyped")
        if payload[0] not in READS:
            raise TokenError(f"token version {payload[0]} is not supported (this zswarm reads 1 and 2)")
        secret = payload[1:1 + SECRET_BYTES]
        rest = 1 + SECRET_BYTES
        operator = b""
        if payload[0] == 2:
            operator, rest = payload[rest:rest + OPERATOR_BYTES], rest + OPERATOR_BYTES
            if len(operator) != OPERATOR_BYTES:
                raise TokenError("the token is too short: was it copied whole?")
        try:
            bootstrap = msgspec.msgpack.decode(payload[rest:], type=list[str])
            bootstrap = tuple(validate_endpoint(b) for b in bootstrap)
        except (msgspec.MsgspecError, ValueError, RecursionError):
            raise TokenError("the token's bootstrap list is unreadable") from None
        return cls(secret, bootstrap, operator)

    def encode(self) -> str:
        head = bytes([2]) + self.secret + self.operator if self.operator else bytes([1]) + self.secret
        payload = head + msgspec.msgpack.encode(list(self.bootstrap))
        raw = payload + hashlib.sha256(payload).digest()[:CHECKSUM_BYTES]
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def derive(self) -> Keys:
        curve_secret = zmq.utils.z85.encode(_hkdf(self.secret, b"curve secret key", 32))
        return Keys(
            curve_public=zmq.curve_public(curve_secret),
            curve_secret=curve_secret,
            network_id=_hkdf(self.secret, b"network id", 8).hex(),
            discovery_key=_hkdf(self.secret, b"discovery hmac", 32),
        )


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=info).derive(secret)


def validate_endpoint(text: str, allow_port_zero: bool = False) -> str:
    """Check a ``host:port`` string (IPv6 hosts in brackets) and return it stripped."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if allow_port_zero else 1) <= int(port) < 65536:
        raise TokenError(f"bad endpoint {text!r}: expected HOST:PORT")
    if host.startswith("[") != host.endswith("]"):
        raise TokenError(f"bad endpoint {text!r}: IPv6 hosts go in brackets")
    return text


def _is_localai_token(text: str) -> bool:
    """LocalAI's token (``local-ai p2p generate-token``): base64 of a YAML document with its
    ``otp`` (one-time-password DHT and mDNS settings) and ``room`` keys."""
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
    except (binascii.Error, ValueError):
        return False
    head = raw[:4096].decode("utf-8", errors="replace")
    return "otp:" in head and ("dht:" in head or "room:" in head)
