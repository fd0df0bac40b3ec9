"""Every message that crosses a socket, as msgspec Structs, and the codecs for them.

Gossip frames are ``[topic, payload]``. The payload is an :class:`Envelope` whose body stays raw
until the protocol version and network id have been checked, so a peer speaking a newer protocol
is refused with a clear reason instead of a decode error. Body tags are part of the protocol:
ONLY APPEND new message types; new fields get defaults so older peers can still read them.
Signatures (protocol 2) cover a record as re-encoded by the receiver (``record_statement``):
a field an older peer does not know would be dropped in its decoding and fail its check, so
adding a field to NodeRecord is a protocol change (bump ``PROTOCOL``).

Nothing here touches a socket; ``decode_*`` raise :class:`BadFrame` and never anything else.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

# 2: every record, beat and leave is signed by the node it is about (identity.py)
# 3: Rotation (the operator revokes nodes and moves the cluster to a new token, rotation.py)
# 4: NodeRecord.holdings (the model files a node holds, by content: models travel, depot/), and
#    prefixes / prefill_tps / decode_tps (what its engine has cached and how fast it is: routing)
PROTOCOL = 4
TOPIC_ALL = b"*"  # every node subscribes to this topic and to its own id


class BadFrame(ValueError):
    """A frame that cannot be read; the caller drops it and counts it."""


# msgspec raises DecodeError/ValidationError, but also UnicodeDecodeError (a ValueError) for
# invalid UTF-8, and RecursionError for absurd nesting: all of them mean "hostile frame".
DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError)


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    """A server's claim on a worker (worker mode): llama.cpp's RPC server serves one client at a
    time, so a worker serves one server's split. Only the claiming server writes it (in its own
    record); who holds a worker is decided from everyone's claims by :func:`zswarm.sharding.holders`."""

    worker: str  # the worker's node id
    since: float  # unix seconds of the claim, on the claiming server's clock
    held: bool = False  # past the settle wait: the server's engine uses (or is about to use) it


class Holding(msgspec.Struct, frozen=True):
    """A model file a node holds (or is fetching), named by its content (``depot/``)."""

    name: str  # the model's wire name (engine/model.py model_name)
    sha256: str  # hex SHA-256 of the whole GGUF file
    size: int  # bytes
    have: int  # bytes of it on the node's disk, verified; == size: whole, and the node serves its pieces


class NodeRecord(msgspec.Struct, kw_only=True):
    """What the cluster knows about one node; replicated, last writer (incarnation, version) wins."""

    id: str
    name: str
    role: str  # "server" | "federated" | "worker"
    incarnation: int  # new at every start of the node: a restarted node beats its old self
    version: int = 0  # bumped by the owner whenever any field below changes
    endpoints: dict[str, str] = {}  # service name ("gossip", "gateway", ...) -> "tcp://host:port"
    models: list[str] = []
    mem_total: int = 0  # bytes
    mem_free: int = 0  # bytes
    in_flight: int = 0
    software: str = ""
    protocol: int = PROTOCOL
    started_at: float = 0.0  # unix seconds
    flags: list[str] = []  # e.g. "federated", "draining"
    claims: list[Claim] = []  # a server's claims on workers; see Claim
    key: bytes = b""  # the node's Ed25519 public key: its id is derived from it (identity.node_id_of)
    curve: str = ""  # the node's own CURVE public key (Z85): what its connections present
    holdings: list[Holding] = []  # model files on this node's disk (depot/): what peers may fetch from it
    # what its engine's slots hold in their caches: each slot's last prompt as prefix.chain hashes
    prefixes: list[list[int]] = []
    prefill_tps: float = 0.0  # its engine's measured speed (uncached prompt tokens per second) ...
    decode_tps: float = 0.0  # ... and generated tokens per second, per request
    served: int = 0  # requests its engine answered since the node started (every page shows the same)
    prefix_hits: int = 0  # ... of which with part of the prompt already in its prompt cache
    sig: bytes = b""  # the node's signature over record_statement(self)


class Beat(msgspec.Struct, tag=1):
    """Sent to everyone every heartbeat: proof of life and how to reach the sender."""

    id: str
    incarnation: int
    version: int
    heartbeat: int
    gossip: str  # the sender's gossip endpoint
    sig: bytes = b""  # the node's signature over beat_statement(id, incarnation, version, heartbeat)


class DigestEntry(msgspec.Struct, array_like=True):
    id: str
    incarnation: int
    version: int
    heartbeat: int
    sig: bytes = b""  # the node's own signature of this heartbeat (its Beat's), relayed as it came


class Digest(msgspec.Struct, tag=2):
    """What the sender knows; lets receivers pull records they lack and relays liveness."""

    entries: list[DigestEntry]


class Want(msgspec.Struct, tag=3):
    """Ask the node on this message's topic for full records."""

    ids: list[str]


class Records(msgspec.Struct, tag=4):
    records: list[NodeRecord]


class Leave(msgspec.Struct, tag=5):
    id: str
    incarnation: int
    sig: bytes = b""  # the node's signature over leave_statement(id, incarnation)


class Revoked(msgspec.Struct, array_like=True):
    """A node the operator removed for good: its id, its identity key and its CURVE key."""

    id: str
    key: bytes
    curve: str
    name: str = ""
    at: float = 0.0  # unix seconds of the revocation


class SealedToken(msgspec.Struct, array_like=True):
    """The new token, sealed to one member's CURVE key (rotation.py): only that member opens it."""

    id: str
    box: bytes


class Rotation(msgspec.Struct, tag=6, kw_only=True):
    """The operator's statement: the token whose network is ``replaces`` gives way to the one
    whose network is ``network``; ``revoked`` (everything revoked so far) are out for good.
    Signed by the operator key the token carries (``rotation_statement``); the boxes are covered
    by their hash, so the statement can travel without them (to a newcomer, it is the revoked list)."""

    operator: bytes
    epoch: int  # 1 for the first rotation, one more for each after it
    replaces: str  # network id of the token it replaces
    network: str  # network id of the new token
    revoked: list[Revoked] = []
    issued: float = 0.0
    eph: bytes = b""  # the X25519 public key the boxes were sealed with
    boxes_hash: bytes = b""  # SHA-256 of the msgpack encoding of ``boxes``
    boxes: list[SealedToken] = []
    sig: bytes = b""


Body = Union[Beat, Digest, Want, Records, Leave, Rotation]


class Envelope(msgspec.Struct, array_like=True):
    proto: int
    net: str
    sender: str
    body: msgspec.Raw


class Message(msgspec.Struct):
    """A decoded, checked message: ``body`` is a gossip Body or an Inference message."""

    sender: str
    body: Any


# --- what a node signs (identity.py): one statement per kind, so no signature means two things ---
_stmt_encoder = msgspec.msgpack.Encoder()


def record_statement(rec: NodeRecord) -> bytes:
    return b"zswarm record|" + _stmt_encoder.encode(msgspec.structs.replace(rec, sig=b""))


def beat_statement(node_id: str, incarnation: int, version: int, heartbeat: int) -> bytes:
    return b"zswarm beat|" + _stmt_encoder.encode([node_id, incarnation, version, heartbeat])


def leave_statement(node_id: str, incarnation: int) -> bytes:
    return b"zswarm leave|" + _stmt_encoder.encode([node_id, incarnation])


def rotation_statement(rot: Rotation) -> bytes:
    return b"zswarm rotation|" + _stmt_encoder.encode(msgspec.structs.replace(rot, boxes=[], sig=b""))


def boxes_hash(boxes: list[SealedToken]) -> bytes:
    import hashlib

    return hashlib.sha256(_stmt_encoder.encode(boxes)).digest()


_env_encoder = msgspec.msgpack.Encoder()
_env_decoder = msgspec.msgpack.Decoder(Envelope)
_body_decoder = msgspec.msgpack.Decoder(Body)


def encode(net: str, sender: str, body: Body) -> bytes:
    return _env_encoder.encode(Envelope(PROTOCOL, net, sender, msgspec.Raw(_env_encoder.encode(body))))


class WrongProtocol(BadFrame):
    gossip: str = ""  # the sender's gossip endpoint, when its message was a Beat: the ledger dials
    # it back, so that the other node hears this one too and says so in its own log


def _gossip_of(body: bytes) -> str:
    """The ``gossip`` of a Beat of any protocol (every protocol so far encodes one as a map)."""
    try:
        obj = msgspec.msgpack.decode(body)
    except DECODE_ERRORS:
        return ""
    gossip = obj.get("gossip") if isinstance(obj, dict) else None
    return gossip if isinstance(gossip, str) and gossip.startswith("tcp://") and len(gossip) < 300 else ""


class WrongNetwork(BadFrame):
    pass


def decode(payload: bytes, net: str) -> Message:
    """Decode a gossip message of network ``net``."""
    return _decode(payload, _body_decoder, net)


def _decode(payload: bytes, decoder: msgspec.msgpack.Decoder, net: str | None) -> Message:
    try:
        env = _env_decoder.decode(payload)
    except DECODE_ERRORS as e:
        raise BadFrame(f"unreadable envelope: {e}") from None
    if env.proto != PROTOCOL:
        err = WrongProtocol(f"protocol {env.proto} from {env.sender!r}; this node speaks {PROTOCOL}")
        err.gossip = _gossip_of(env.body)
        raise err
    if net is not None and env.net != net:
        raise WrongNetwork(f"network {env.net!r} is not ours")
    try:
        body = decoder.decode(env.body)
    except DECODE_ERRORS as e:
        raise BadFrame(f"unreadable body from {env.sender!r}: {e}") from None
    return Message(env.sender, body)


# --- admin socket (JSON, so an operator can speak it with any ZeroMQ client) ---

class AdminRequest(msgspec.Struct):
    command: str
    id: int = 0
    args: dict[str, Any] = {}


class AdminError(msgspec.Struct):
    code: int
    message: str


class AdminReply(msgspec.Struct, omit_defaults=True):
    id: int
    ok: bool
    result: Any = None
    error: Union[AdminError, None] = None


_admin_req_decoder = msgspec.json.Decoder(AdminRequest)
_admin_rep_decoder = msgspec.json.Decoder(AdminReply)


def decode_admin_request(payload: bytes) -> AdminRequest:
    try:
        return _admin_req_decoder.decode(payload)
    except DECODE_ERRORS as e:
        raise BadFrame(str(e)) from None


def decode_admin_reply(payload: bytes) -> AdminReply:
    try:
        return _admin_rep_decoder.decode(payload)
    except DECODE_ERRORS as e:
        raise BadFrame(str(e)) from None


def encode_json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


# --- inference: HTTP worker -> node -> (peer node) -> engine process, and the stream back ---
# The same messages travel every hop; a hop forwards them without re-encoding the body.
# Frames: [payload] (DEALER side) / [routing id..., payload] (ROUTER side), payload = Envelope.

class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str = ""
    name: Union[str, None] = None


class GenRequest(msgspec.Struct, tag=101, kw_only=True, omit_defaults=True):
    """One completion. ``kind`` is "chat" (``messages``) or "completion" (``prompt``)."""

    id: str  # unique per request (hex); every reply carries it
    kind: str
    model: str
    messages: list[ChatMessage] = []
    prompt: str = ""
    max_tokens: Union[int, None] = None  # None: until the context is full or a stop
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = []
    seed: Union[int, None] = None
    deadline: float = 0.0  # unix seconds after which nobody waits for the answer; 0: none
    target_node: str = ""  # route to this node only (LocalAI's target worker)
    hops: int = 0  # incremented by each gateway that forwards it; a gateway refuses hops > 1
    # seconds left to answer, as the sender saw it when it sent; each hop re-bases it on its own
    # clock (``deadline`` is the same instant in wall-clock form, for the engine on this machine)
    timeout_s: float = 0.0
    # the client gets the answer whole (not streamed): its entry gateway holds the chunks, so the
    # request can be retried on another node until its Done
    whole: bool = False
    # the answer must be JSON (response_format): any object, or valid against json_schema (JSON
    # text of a JSON Schema); the engine constrains generation with a llama.cpp grammar
    json_output: bool = False
    json_schema: str = ""


class Cancel(msgspec.Struct, tag=102):
    """The client went away: stop generating ``id``."""

    id: str


class Chunk(msgspec.Struct, tag=103, omit_defaults=True):
    id: str
    text: str
    node: str = ""  # the serving node's id, on its first chunk: a stream's headers name it (issue 15)


class Done(msgspec.Struct, tag=104, kw_only=True):
    id: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    node: str = ""  # id of the node whose engine answered
    cached_tokens: int = 0  # prompt tokens the engine's cache held already (not evaluated again)
    prompt_s: float = 0.0  # seconds from the slot taking the request to its first token
    gen_s: float = 0.0  # seconds from the first token to the last


class Fail(msgspec.Struct, tag=105, kw_only=True):
    id: str
    code: str  # see FAIL_CODES
    message: str
    started: bool = False  # had any Chunk been sent? then it must not be retried elsewhere
    node: str = ""


class ModelsQuery(msgspec.Struct, tag=106):
    """Which models can this node serve, itself or through the cluster?"""

    id: str


class ModelsReply(msgspec.Struct, tag=107):
    id: str
    models: list[str]
    # why this node serves nothing although it should (its engine failed before ready, with the
    # remedy); "" when there is nothing to say. Answered to the node's own HTTP app only.
    problem: str = ""
    # models served lately that no node serves right now (a restart, a brief partition): the HTTP
    # app answers them 503 with Retry-After, not 404. Answered to the node's own HTTP app only.
    recent: list[str] = []


# --- models travel (depot/): a node fetches a model file's pieces from peers that hold it ---
# Same sockets as inference (a peer's gateway ROUTER); only a whole, verified file is served.

class ManifestQuery(msgspec.Struct, tag=108):
    """What are the pieces of the file ``sha256``?"""

    id: str
    sha256: str


class Manifest(msgspec.Struct, tag=109, kw_only=True):
    id: str
    sha256: str
    size: int
    piece_bytes: int
    pieces: list[bytes]  # SHA-256 of each piece, in order: each piece is checked as it arrives


class PieceQuery(msgspec.Struct, tag=110):
    id: str
    sha256: str
    index: int


class Piece(msgspec.Struct, tag=111, kw_only=True):
    id: str
    sha256: str
    index: int
    data: bytes = b""
    # > 0: the holder is at its share rate; ask again after this many seconds (data is empty)
    wait_s: float = 0.0


FAIL_CODES = {
    "bad_request": 400,  # the engine refused the parameters
    "context_length": 400,  # prompt (plus max_tokens) does not fit the context
    "model_not_found": 404,
    "overloaded": 503,  # every slot busy and the queue full
    "engine_down": 503,  # the engine process died or is restarting
    "no_node": 503,  # no node serves the model
    "timeout": 504,  # deadline passed
    "cancelled": 499,
    "internal": 500,
}

Inference = Union[GenRequest, Cancel, Chunk, Done, Fail, ModelsQuery, ModelsReply,
                  ManifestQuery, Manifest, PieceQuery, Piece]
_inference_decoder = msgspec.msgpack.Decoder(Inference)


def encode_inference(sender: str, body: Inference) -> bytes:
    return encode("", sender, body)


def decode_inference(payload: bytes) -> Message:
    """Decode an inference message. It carries no network id: it arrives over ipc, or over a
    CURVE socket that only the cluster's key opens."""
    return _decode(payload, _inference_decoder, None)
