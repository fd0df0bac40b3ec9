"""Revoking machines and moving the cluster to a new token: the operator's signed statement.

A revoked machine still knows the token, so revoking it means the cluster moves to a new token at
the same moment, and the new token must reach every remaining member without passing through
the machine being removed. The operator's client (``zswarm admin revoke``, cli_rotate.py) makes
a :class:`~zswarm.wire.Rotation`:

- the new token (a new secret, the same operator and bootstrap: ``Token.successor``),
- sealed to each remaining member's own CURVE key (X25519 with one ephemeral key, HKDF-SHA256,
  ChaCha20-Poly1305; the box is bound to the member's id and the statement's networks), so the
  statement can be flooded through the gossip to everyone and only members open their box,
- the cumulative list of revoked nodes (id, identity key, CURVE key),
- signed with the operator key whose public half the current token carries.

A node believes a statement only if the operator of its own token signed it, and only for its
own network: ``replaces`` is its network (it switches to the token in its box) or ``network`` is
(it joined with the new token already, and learns the revoked list). Replays of older statements
name older networks and change nothing. Pure: no socket, no file, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import zmq.utils.z85
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import wire
from .identity import verify
from .token import Token, TokenError

MAX_REVOKED = 1024  # nodes a cluster remembers as revoked (cumulative across rotations)
MAX_BOXES = 1024  # members a rotation can carry the new token to (trust.MAX_NODES is 256)
_NONCE = bytes(12)  # every box has a key of its own (one ephemeral key, one recipient): no nonce reuse

SWITCH, LEARN, STALE, FORGED, FOREIGN, OVERSIZED, BARE = (
    "switch", "learn", "stale", "forged", "foreign", "oversized", "bare")
# a statement must fit a gossip frame (transport.MAXMSGSIZE, 1 MiB) and, in base64, the admin
# request that hands it to a node: three quarters of it, with room for the envelope
MAX_STATEMENT_BYTES = 700 * 1024


class RotationError(ValueError):
    """A rotation that cannot be made; one line for the operator."""


@dataclass(frozen=True)
class Member:
    id: str
    curve: str  # its own CURVE public key, Z85 (from its signed record)


def _box_key(shared: bytes, eph: bytes, recipient: bytes, node_id: str, replaces: str, network: str) -> bytes:
    info = b"zswarm rotation box|" + msgspec.msgpack.encode([eph, recipient, node_id, replaces, network])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _curve_raw(z85: str) -> bytes:
    try:
        raw = zmq.utils.z85.decode(z85)
    except (ValueError, TypeError, KeyError, IndexError):
        return b""
    return raw if isinstance(raw, bytes) and len(raw) == 32 else b""


def make(operator, current: Token, members: list[Member], revoked_before: list[wire.Revoked],
         revoke: list[wire.Revoked], epoch_before: int, now: float) -> tuple[wire.Rotation, Token]:
    """The statement that revokes ``revoke`` (on top of ``revoked_before``) and hands a new token
    to ``members`` (everyone else), and that token. ``operator`` is an :class:`~.operator.OperatorKey`."""
    if not current.operator:
        raise RotationError("this cluster's token has no operator key (it was made before zswarm could "
                            "revoke): move the cluster to a token from `zswarm token new` first")
    if operator.public != current.operator:
        raise RotationError("this operator key is not the one the cluster's token names")
    gone = {r.id for r in revoke} | {r.id for r in revoked_before}
    revoked = list({r.id: r for r in [*revoked_before, *revoke]}.values())
    if len(revoked) > MAX_REVOKED:
        raise RotationError(f"more than {MAX_REVOKED} revoked nodes")
    recipients = [m for m in members if m.id not in gone]
    if len(recipients) > MAX_BOXES:
        raise RotationError(f"more than {MAX_BOXES} members")
    new = current.successor()
    replaces, network = current.derive().network_id, new.derive().network_id
    eph_key = X25519PrivateKey.generate()
    eph = eph_key.public_key().public_bytes_raw()
    text = new.encode().encode()
    boxes = []
    for m in recipients:
        raw = _curve_raw(m.curve)
        if not raw:
            continue  # a record without a CURVE key cannot be sealed to: it must be re-joined by hand
        try:
            shared = eph_key.exchange(X25519PublicKey.from_public_bytes(raw))
        except ValueError:
            continue  # a degenerate key (all zeros...): nobody holds a secret for it
        key = _box_key(shared, eph, raw, m.id, replaces, network)
        boxes.append(wire.SealedToken(m.id, ChaCha20Poly1305(key).encrypt(_NONCE, text, None)))
    rot = wire.Rotation(operator=operator.public, epoch=epoch_before + 1, replaces=replaces, network=network,
                        revoked=revoked, issued=now, eph=eph, boxes_hash=wire.boxes_hash(boxes), boxes=boxes)
    rot.sig = operator.sign(wire.rotation_statement(rot))
    if len(msgspec.msgpack.encode(rot)) > MAX_STATEMENT_BYTES:
        raise RotationError(f"the statement is larger than {MAX_STATEMENT_BYTES // 1024} KiB: too many members "
                            "or revoked nodes for one rotation")
    return rot, new


def without_boxes(rot: wire.Rotation) -> wire.Rotation:
    """The statement as a newcomer gets it: the revoked list, still verifiable, no boxes."""
    return msgspec.structs.replace(rot, boxes=[])


def judge(rot: wire.Rotation, operator: bytes, network: str, epoch: int) -> str:
    """What a node whose token has ``operator`` and ``network``, and that has seen rotations up
    to ``epoch``, makes of ``rot``: SWITCH (it replaces our token), LEARN (it is about our token
    already: take its revoked list), STALE (nothing new), FOREIGN (another cluster's, or our
    token has no operator), FORGED (not the operator's signature), OVERSIZED, BARE (it replaces
    our token but came without its boxes: the full one is on its way, or passed us by).

    A statement that replaces our network is new by that alone (each network is replaced once,
    and older statements replaced older networks), so SWITCH does not depend on ``epoch``: a
    node whose operator made the statement may have seen fewer rotations than the others."""
    if not operator or rot.operator != operator:
        return FOREIGN
    if len(rot.revoked) > MAX_REVOKED or len(rot.boxes) > MAX_BOXES:
        return OVERSIZED
    if rot.replaces == network:
        relation = SWITCH
    elif rot.network == network:
        relation = LEARN
    else:
        return FOREIGN  # another generation of this cluster than ours: nothing we can check it against
    if relation == LEARN and rot.epoch <= epoch:
        return STALE
    if relation == SWITCH and not rot.boxes and rot.boxes_hash != wire.boxes_hash([]):
        return BARE
    if not verify(operator, rot.sig, wire.rotation_statement(rot)):
        return FORGED
    if relation == SWITCH and wire.boxes_hash(rot.boxes) != rot.boxes_hash:
        return FORGED  # a switch needs the boxes, exactly as signed
    return relation


def open_box(rot: wire.Rotation, node_id: str, curve_secret: bytes) -> Token | None:
    """The new token from ``node_id``'s box (``curve_secret``: its own, Z85), or None (no box
    for it, or one that does not open, or a token that is not the statement's)."""
    box = next((b for b in rot.boxes if b.id == node_id), None)
    if box is None or len(rot.eph) != 32:
        return None
    secret = X25519PrivateKey.from_private_bytes(zmq.utils.z85.decode(curve_secret))
    mine = secret.public_key().public_bytes_raw()
    try:
        shared = secret.exchange(X25519PublicKey.from_public_bytes(rot.eph))
        key = _box_key(shared, rot.eph, mine, node_id, rot.replaces, rot.network)
        token = Token.parse(ChaCha20Poly1305(key).decrypt(_NONCE, box.box, None).decode())
    except (InvalidTag, ValueError, TokenError, UnicodeDecodeError):
        return None
    if token.derive().network_id != rot.network or token.operator != rot.operator:
        return None
    return token

