"""Ledger actor: the replicated record of every node, carried by gossip.

Owns (through its SocketLoop thread) the gossip sockets:
- a SUB that binds on the node's p2p address (CURVE server): everything peers tell us arrives here;
- a PUB that connects to every peer it knows (CURVE client): everything we tell peers leaves here.

The sender dials, so knowing one peer's address is enough to be heard by it; the peer then dials
back the address our Beat carries, and peer exchange (Digest, Want, Records) spreads the rest.
Topics make PUB/SUB double as unicast: every node subscribes to ``*`` and to its own id.

Both sockets get :func:`~zswarm.transport.link_options`: ZMTP heartbeats close a link that a
partition broke, and the PUB keeps dialing (a SYN about once a second) every peer it knows and
every peer removed for silence (``Timing.redial_s``), so each side of a healed partition hears
the other's own beats within about a second, and :mod:`zswarm.membership` believes them.

The rules of merging and liveness live in :mod:`zswarm.membership`; this actor only moves
messages between it and the sockets. Frames are decoded in the loop thread; a bad one is dropped
and counted there and never reaches the actor.

Without it the node is nobody to the cluster: when it dies, the node stops (``node.py``) and
systemd starts it again; peers see its silence and, once it is back, its new incarnation.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from .. import rotation, wire
from ..membership import Changes, Membership, Timing
from ..gate import Gate
from ..identity import Identity
from ..token import Keys, Token
from ..tokenstore import ClusterState
from ..trust import FORGED, Limits, Trust
from ..transport import SocketLoop, Stats, curve_client, curve_server, link_options, tcp
from .base import GuardedActor, Watch
from .listener import notify, tell, tell_later

log = logging.getLogger(__name__)

WANT_RETRY_S = 1.0  # ask again for a record that has not come; PUB drops sends to a pipe not yet up
MAX_REMEMBERED = 64  # peers dialed again after a restart
REMEMBER_EVERY_S = 5.0  # how often the list of alive peers is written to the state directory
MAX_WANTED = 256  # records sent for one Want at most (a cluster holds trust.MAX_NODES)
HELLO_AGAIN_S = 0.15  # a subscription crosses a fresh connection in well under this
# How long the Leave may take to flush when the node stops (the context's term waits this long
# for a peer that is not reading). A LAN takes milliseconds; a peer that misses it notices the
# silence anyway; and the whole node has STOP_BUDGET_S (node.py) to stop.
LEAVE_LINGER_MS = 300
# After a rotation the node relays the statement, then waits this long before it moves its
# gossip sockets to the new token's key: the relays reach the peers over the old links first.
SWITCH_DELAY_S = 1.0
# ... and keeps its old PUB, links and all, this long after it moved, sending the statement on it
# every beat: a member whose link was down when the statement was flooded gets it when the link
# is back (its own SUB still has the old key), rather than being cut off for good.
ROTATION_GRACE_S = 30.0
REFUSED_REMEMBERED = 256  # signatures of refused rotations: a repeat costs no second check
MAX_OTHER_PROTOCOL_DIALS = 64  # nodes of another protocol dialed back (each logs our refusal once)


@dataclass
class _Inbound:
    msg: wire.Message
    key: str  # the CURVE key the sender's connection presented (Z85): who really sent it


@dataclass
class _Link:
    """Our PUB's connection to ``endpoint`` came up (handshake done) or went down."""

    endpoint: str
    up: bool


class _Tick:
    pass


class _HelloAgain:
    pass


@dataclass
class _DialBack:
    endpoint: str


@dataclass
class _Switch:
    token: Token


@dataclass
class _SwitchFailed:
    why: str


class BindError(RuntimeError):
    pass


class LedgerActor(GuardedActor):
    name = "ledger"

    def __init__(self, ctx: zmq.Context, keys: Keys, identity: Identity, own: wire.NodeRecord, listen: str,
                 advertise_host: str, stats: Stats, timing: Timing = Timing(), peers_file: Path | None = None,
                 watch: Watch | None = None, limits: Limits = Limits(),
                 on_change: Callable[[list[wire.NodeRecord], dict[str, str]], None] | None = None,
                 cluster: ClusterState | None = None,
                 on_rotation: Callable[[ClusterState, list[wire.Revoked]], None] | None = None):
        super().__init__(watch)
        self._peers_file = peers_file
        self._peers_saved: list[str] = []
        self._ctx = ctx
        self._keys = keys
        self._net = keys.network_id
        self._listen = listen
        self._advertise_host = advertise_host
        self._stats = stats
        self._timing = timing
        self._identity = identity
        self.m = Membership(own, timing, signer=identity.sign)
        fresh_s = timing.suspect_after_s / 2
        self.trust = Trust(own.id, self.m.key_of, stats.inc, limits, self.m.held_record,
                           lambda node_id: self.m.heard_directly_within(node_id, fresh_s))
        self._wrong_protocol: set[str] = set()  # senders already told of in the log
        self._dialed_back: set[str] = set()  # ... and those of them dialed back (io thread)
        # the token (rotation.py): the node is told every change (ZAP's deny list, the state
        # file, the admin's token, discovery's keys), in this thread, without blocking
        self.cluster = cluster
        self._on_rotation = on_rotation
        self._revoked_keys: set[str] = set()  # CURVE keys (Z85) of revoked nodes: nothing they send is read
        self._pending: wire.Rotation | None = None  # the full statement, resent until the grace ends
        self._pending_until = 0.0  # monotonic; 0: not switched yet
        self._old_net = ""  # the network the old PUB speaks for, during the grace
        self._old_pub: zmq.Socket | None = None  # io thread: the PUB of the old token, during the grace
        self._refused: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        # told every record and state after each change, in this thread (it must not block): the
        # ZAP handler learns the members' own keys, a worker's tunnel exit whom it serves
        self._on_change = on_change
        self._loop: SocketLoop | None = None
        self._dialed: dict[str, set[str]] = {}  # endpoint -> reasons ("bootstrap", "mdns", "peer")
        self._links_up: set[str] = set()  # endpoints our PUB has a live connection to
        self._wants: dict[str, tuple[str, float]] = {}  # node id -> (peer to ask, last asked)
        self._listeners: list[Any] = []
        self._last_sync = 0.0
        self._last_remember = 0.0
        self._self_endpoints: set[str] = set()
        if cluster is not None:
            self._adopt_revoked(cluster.revoked)

    # --- API (asked by the node and other actors) ---
    def open(self) -> wire.NodeRecord:
        """Bind and start gossiping; returns our record with its gossip endpoint filled in."""
        loop = SocketLoop("ledger-io", self._ctx, self._setup, self._timing.heartbeat_interval_s,
                          lambda: tell(self.actor_ref, _Tick()))
        try:
            loop.start_and_wait()
        except zmq.ZMQError as e:
            raise BindError(f"cannot listen on {self._listen}: {e.strerror}") from None
        self._loop = loop
        self.m.sign_own()  # the gossip endpoint is in it now
        for endpoint in self._remembered():
            self._dial(endpoint, "remembered")
        self._send(wire.TOPIC_ALL, self.m.beat())
        return self.m.own

    def add_listener(self, ref: Any) -> None:
        """``ref`` hears ``ledger_changed``; listeners that have stopped (one the node replaced) go."""
        self._listeners = [r for r in self._listeners if r.is_alive()] + [ref]

    def dial(self, endpoint: str, reason: str) -> None:
        self._dial(tcp(endpoint), reason)

    def undial(self, endpoint: str, reason: str) -> None:
        self._undial(tcp(endpoint), reason)

    def own(self) -> wire.NodeRecord:
        return self.m.own

    def update_own(self, **fields: Any) -> None:
        """Change our record (models, load, memory...) and push it to everyone at once."""
        own = self.m.update_own(**fields)
        self._send(wire.TOPIC_ALL, wire.Records([own]))

    def set_flag(self, flag: str, on: bool) -> None:
        """Add or remove one flag of our record (e.g. ``rpc``): read and written here in one step,
        so that another actor can ``tell`` it rather than ask for our record first and block."""
        flags = set(self.m.own.flags)
        if (flag in flags) != on:
            self.update_own(flags=sorted(flags | {flag} if on else flags - {flag}))

    def peers(self) -> list[dict]:
        return self.m.peers()

    def records(self) -> list[wire.NodeRecord]:
        return [self.m.own] + [m.record for m in self.m.members.values() if m.record is not None]

    def rotation_info(self) -> dict[str, Any]:
        """What the operator's client needs to make a rotation (the token included: admin only)."""
        cs = self.cluster
        return {"token": cs.token.encode() if cs else "", "epoch": cs.epoch if cs else 0,
                "revoked": [{"id": r.id, "name": r.name, "at": r.at, "key": r.key.hex(), "curve": r.curve}
                            for r in (cs.revoked if cs else [])],
                "members": [_member(r, "self" if r.id == self.m.own.id else self.m.members[r.id].state)
                            for r in self.records()]
                # removed for silence (a lost laptop that is off): revocable too, and sealed to if
                # not revoked, in case it comes back
                + [_member(r, "removed") for r in self.m.departed() if r.id not in self.m.members]}

    def revoked(self) -> list[dict[str, Any]]:
        """The nodes the operator revoked: id, name, when (unix seconds)."""
        return [{"id": r.id, "name": r.name, "at": r.at} for r in (self.cluster.revoked if self.cluster else [])]

    def rotate(self, statement: bytes) -> dict[str, Any]:
        """The operator's rotation, from the admin socket: checked, then applied and flooded."""
        try:
            rot = msgspec.msgpack.decode(statement, type=wire.Rotation)
        except wire.DECODE_ERRORS as e:
            raise ValueError(f"unreadable rotation: {e}") from None
        verdict = self._judge(rot)
        if verdict != rotation.SWITCH:
            raise ValueError({rotation.STALE: "the cluster has moved on since this rotation was made: try again",
                              rotation.FORGED: "the rotation is not signed by the cluster's operator key",
                              rotation.FOREIGN: "the rotation is not for this node's token",
                              rotation.OVERSIZED: "the rotation is too large",
                              rotation.BARE: "the rotation has no sealed tokens",
                              rotation.LEARN: "the rotation is in force already"}[verdict])
        self._rotation(rot, rotation.SWITCH)
        return {"epoch": rot.epoch, "network": rot.network, "revoked": [r.id for r in rot.revoked],
                "delivered": len(rot.boxes)}

    # --- the socket thread (runs in ledger-io, never in the actor) ---
    def _make_sub(self, loop: SocketLoop, listen: str) -> zmq.Socket:
        sub = loop.add(self._ctx.socket(zmq.SUB), self._on_frames, frames=True)
        curve_server(sub, self._keys)
        link_options(sub)  # heartbeats close what a partition left of a peer's link
        sub.subscribe(wire.TOPIC_ALL)
        sub.subscribe(self.m.own.id.encode())
        loop.guard_socket(sub, Gate("gossip", self._stats))  # strangers' idle connections are bounded
        try:
            sub.bind(tcp(listen))
        except zmq.ZMQError:
            loop.remove_guarded(sub)
            raise
        return sub

    def _make_pub(self, loop: SocketLoop, keys: Keys) -> tuple[zmq.Socket, zmq.Socket]:
        pub = loop.socket(zmq.PUB)
        curve_client(pub, keys, (self._identity.curve_public, self._identity.curve_secret))
        link_options(pub)  # a broken link is closed by heartbeats and redialed about once a second
        mon = loop.add(pub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED),
                       self._on_pub_event)
        return pub, mon

    def _setup(self, loop: SocketLoop) -> None:
        sub = self._make_sub(loop, self._listen)
        port = sub.last_endpoint.decode().rsplit(":", 1)[1]
        pub, self._pub_mon = self._make_pub(loop, self._keys)
        self._sub, self._pub = sub, pub
        host = self._advertise_host
        gossip = f"tcp://{host}:{port}"
        self.m.own.endpoints = {**self.m.own.endpoints, "gossip": gossip}
        self._self_endpoints = {gossip, f"tcp://127.0.0.1:{port}", tcp(self._listen)}

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        self._stats.inc("gossip_in")
        self._stats.inc("gossip_in_bytes", sum(len(f) for f in frames))
        if len(frames) != 2:
            self._drop(f"{len(frames)} frames")
            return
        try:
            key = frames[1].get("User-Id")
        except zmq.ZMQError:
            key = ""
        if key and key in self._revoked_keys:
            self._stats.inc("gossip_revoked")
            return
        try:
            msg = wire.decode(frames[1].bytes, self._net)
        except wire.WrongProtocol as e:
            self._drop(str(e))
            sender = str(e).split("from ", 1)[-1].split(";", 1)[0]
            if sender not in self._wrong_protocol and len(self._wrong_protocol) < 1000:
                self._wrong_protocol.add(sender)
                log.warning("refused gossip from node %s: %s (upgrade every node of the cluster; see the README)",
                            sender, e)
            if e.gossip and sender not in self._dialed_back and len(self._dialed_back) < MAX_OTHER_PROTOCOL_DIALS:
                # dialed back once (its first Beat says where), so that the other side hears us,
                # refuses us too and says so in its own log
                self._dialed_back.add(sender)
                tell(self.actor_ref, _DialBack(e.gossip))
            return
        except wire.BadFrame as e:
            self._drop(str(e))
            return
        if msg.sender == self.m.own.id:
            return  # we dialed ourselves through a bootstrap address; harmless
        if isinstance(msg.body, wire.Beat) and msg.body.id != msg.sender:
            self._drop("beat for another node")
            return
        tell(self.actor_ref, _Inbound(msg, key or ""))

    def _drop(self, why: str) -> None:
        self._stats.inc("gossip_bad_frames")
        log.debug("dropped a gossip frame: %s", why)

    def _on_pub_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        up = event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        tell(self.actor_ref, _Link(event["endpoint"].decode(errors="replace"), up))

    # --- actor thread ---
    def handle(self, message: Any) -> None:
        if isinstance(message, _Inbound):
            self._handle(message.msg, message.key)
        elif isinstance(message, _Tick):
            self._tick()
        elif isinstance(message, _Link) and not message.up:
            self._links_up.discard(message.endpoint)
        elif isinstance(message, _Link):
            self._links_up.add(message.endpoint)
            self._hello()
            # ZeroMQ's slow joiner: the peer's subscription may not have reached our PUB yet, and
            # PUB drops what no subscription matches; say it again a moment later
            tell_later(self.actor_ref, _HelloAgain(), HELLO_AGAIN_S)
        elif isinstance(message, _HelloAgain):
            self._hello()
        elif isinstance(message, _DialBack):
            self._dial(message.endpoint, "other protocol")
        elif isinstance(message, _Switch):
            self._switch(message.token)
        elif isinstance(message, _SwitchFailed):  # deaf to the cluster: better stop (systemd starts us again)
            raise RuntimeError(f"cannot move the gossip port to the new token: {message.why}")

    def _hello(self) -> None:
        """Tell a new connection (and everyone) who we are and what we know, and ask what we lack."""
        self._send(wire.TOPIC_ALL, self.m.beat())
        self._send(wire.TOPIC_ALL, wire.Records([self.m.own]))  # who we are, signed: our key binds here
        self._send(wire.TOPIC_ALL, wire.Digest(self.m.digest()))
        if self._pending is not None and not self._pending_until:
            self._send(wire.TOPIC_ALL, self._pending)  # not switched yet: a late link gets the boxes too
        elif self.cluster is not None and self.cluster.rotation is not None:
            self._send(wire.TOPIC_ALL, self.cluster.rotation)  # newcomers learn who is revoked
        self._ask(force=True)

    def _handle(self, msg: wire.Message, key: str) -> None:
        # A sender we know must speak over a connection with its own key: anything else is
        # someone using its name (a relay keeps its own name and signs nothing of others').
        if (sender := self.m.members.get(msg.sender)) is not None and sender.record is not None \
                and sender.record.curve != key:
            self._stats.inc(FORGED)
            log.debug("dropped gossip in the name of %s from another key", msg.sender)
            return
        match msg.body:
            case wire.Beat() as beat:
                if self.trust.beat(beat, key):
                    self._apply(self.m.on_beat(beat))
                    if self.m.key_of(beat.id) is not None:  # verified, over the node's own connection
                        self.trust.heard_directly(beat.id)
            case wire.Digest(entries=entries):
                self._apply(self.m.on_digest(msg.sender, self.trust.entries(entries, key, self.m.held)))
            case wire.Want(ids=ids):
                records = self.m.records(ids[:MAX_WANTED])
                if records:
                    self._send(msg.sender.encode(), wire.Records(records))
            case wire.Records(records=records):
                good = [r for r in records if self.trust.record(r, key) and not self._curve_taken(r)]
                for r in good:
                    self._wants.pop(r.id, None)
                self._apply(self.m.on_records(good))
            case wire.Leave() as leave:
                if self.trust.leave(leave):
                    self._apply(self.m.on_leave(leave.id, leave.incarnation))
            case wire.Rotation() as rot:
                if rot.sig in self._refused:
                    self._stats.inc("rotation_refused")
                    return
                verdict = self._judge(rot)
                if verdict in (rotation.SWITCH, rotation.LEARN):
                    self._rotation(rot, verdict)
                elif verdict in (rotation.FORGED, rotation.OVERSIZED):
                    self._stats.inc("rotation_refused")
                    self._refused[rot.sig] = None
                    while len(self._refused) > REFUSED_REMEMBERED:
                        self._refused.popitem(last=False)
                    log.debug("refused a rotation from %s: %s", msg.sender, verdict)

    def _curve_taken(self, rec: wire.NodeRecord) -> bool:
        """Does another node's record hold ``rec``'s CURVE key? A record's key is its owner's
        word, so a member could claim another's (and get it refused when it is revoked itself):
        the first holder keeps it."""
        if not rec.curve:
            return False
        if rec.curve == self.m.own.curve or any(m.record is not None and m.record.curve == rec.curve and i != rec.id
                                                for i, m in self.m.members.items()):
            self._stats.inc(FORGED)
            log.debug("dropped the record of %s: its CURVE key is another node's", rec.id)
            return True
        return False

    # --- rotation (rotation.py) ---
    def _judge(self, rot: wire.Rotation) -> str:
        """Against the token we hold, or are about to move to: a second rotation made while the
        first one's switch is pending replaces the new token, not the old."""
        cs = self.cluster
        if cs is None:
            return rotation.FOREIGN
        return rotation.judge(rot, cs.token.operator, cs.token.derive().network_id, cs.epoch)

    def _rotation(self, rot: wire.Rotation, verdict: str) -> None:
        """Believe ``rot``: revoke whom it names; on SWITCH pass it on, and move to the new token."""
        cs = self.cluster
        # passed on first (flooded: each node passes it on once, the epoch moves on), so that a
        # node being revoked hears it too, and says so, before its links are cut
        self._send(wire.TOPIC_ALL, rot)
        me = self.m.own.id
        if any(r.id == me for r in rot.revoked):
            log.error("the cluster's operator revoked this node: it is out of the cluster for good "
                      "(a new identity and the current token are needed to join again)")
            self._stats.inc("rotation_revoked_me")
            self.cluster = ClusterState(cs.token, max(cs.epoch, rot.epoch), cs.superseded, rotation.without_boxes(rot))
            return
        newly = [r for r in rot.revoked if r.id not in self.trust.revoked]
        self._adopt_revoked(rot.revoked)
        for r in newly:
            log.warning("node %s (%s) was revoked by the operator", r.id, r.name or "?")
        token = None
        if verdict == rotation.SWITCH:
            token = rotation.open_box(rot, me, self._identity.curve_secret)
            if token is None:
                log.error("the cluster moved to a new token without this node (it was not a member when the "
                          "operator rotated the token): it is cut off; give it the current token "
                          "(`zswarm admin token` on a member) to join again")
                self._stats.inc("rotation_left_out")
        replaced = cs.token.derive().network_id
        superseded = cs.superseded + [replaced] if token is not None else cs.superseded
        self.cluster = ClusterState(token or cs.token, max(cs.epoch, rot.epoch), superseded,
                                    rotation.without_boxes(rot))
        self._stats.inc("rotations")
        if token is not None:
            self._pending, self._pending_until = rot, 0.0
            log.info("the operator rotated the cluster token (epoch %d): moving to network %s in %.0f s",
                     rot.epoch, rot.network, SWITCH_DELAY_S)
            tell_later(self.actor_ref, _Switch(token), SWITCH_DELAY_S)
        if self._on_rotation is not None:
            self._on_rotation(self.cluster, newly)

    def _adopt_revoked(self, revoked: list[wire.Revoked]) -> None:
        for r in revoked:
            self.trust.revoked.add(r.id)
            if r.curve:
                self._revoked_keys.add(r.curve)
            self._wants.pop(r.id, None)
        for r in revoked:
            if r.id in self.m.members or r.id in self.m.redialing():
                self._apply(self.m.revoke(r.id))

    def _switch(self, token: Token) -> None:
        """Move the gossip sockets to ``token``'s keys: a new SUB on the same port (a CURVE server
        key is read at bind) and a new PUB that dials every peer with the new server key. The
        old PUB stays, links and all, for ROTATION_GRACE_S, and carries the statement (_tick)."""
        if self.cluster is None or token != self.cluster.token:
            return  # a newer rotation came meanwhile: its own switch is on its way
        self._old_net = self._net
        self._keys = token.derive()
        self._net = self._keys.network_id
        self._pending_until = time.monotonic() + ROTATION_GRACE_S
        keys, dialed = self._keys, list(self._dialed)
        port = self.m.own.endpoints["gossip"].rsplit(":", 1)[1]
        listen = f"{self._listen.rsplit(':', 1)[0]}:{port}"
        ref = self.actor_ref

        def _rekey(loop: SocketLoop = self._loop) -> None:
            loop.remove_guarded(self._sub)
            sub, why = None, ""
            for _ in range(50):  # libzmq closes the old listener in its own thread: milliseconds
                try:
                    sub = self._make_sub(loop, listen)
                    break
                except zmq.ZMQError as e:
                    why = e.strerror
                    if e.errno != zmq.EADDRINUSE:
                        break
                    time.sleep(0.02)
            if sub is None:
                tell(ref, _SwitchFailed(f"cannot listen on {listen}: {why}"))
                return
            self._sub = sub
            self._close_old_pub(loop)  # a grace still running from an earlier rotation
            self._old_pub = self._pub
            try:
                self._old_pub.disable_monitor()  # its links' events are no longer ours to follow
            except zmq.ZMQError:
                pass
            loop.remove(self._pub_mon)
            self._pub, self._pub_mon = self._make_pub(loop, keys)
            for endpoint in dialed:
                self._pub.connect(endpoint)
        if self._loop is not None:
            self._loop.submit(_rekey)
        self._links_up.clear()
        log.info("gossip moved to the new token (network %s)", self._net)

    def _close_old_pub(self, loop: SocketLoop) -> None:
        """io thread: the grace is over."""
        if self._old_pub is not None:
            loop.remove(self._old_pub)
            self._old_pub = None

    def _resend_statement(self) -> None:
        """Every beat while a rotation is pending or in its grace: the full statement, on the
        old token's links (those who have not moved yet)."""
        rot = self._pending
        if rot is None or self._loop is None:
            return
        if not self._pending_until:
            self._send(wire.TOPIC_ALL, rot)
            return
        if time.monotonic() >= self._pending_until:
            self._pending = None
            self._loop.submit(lambda loop=self._loop: self._close_old_pub(loop))
            return
        payload = wire.encode(self._old_net, self.m.own.id, rot)

        def _out() -> None:
            if self._old_pub is not None:
                try:
                    self._old_pub.send_multipart([wire.TOPIC_ALL, payload], zmq.NOBLOCK)
                except zmq.Again:
                    pass
        self._loop.submit(_out)

    def _tick(self) -> None:
        self._send(wire.TOPIC_ALL, self.m.beat())
        self._resend_statement()
        now = time.monotonic()
        if now - self._last_sync >= self._timing.sync_interval_s:
            self._last_sync = now
            self._send(wire.TOPIC_ALL, wire.Digest(self.m.digest()))
        self._apply(self.m.sweep())
        self._ask()
        if now - self._last_remember >= REMEMBER_EVERY_S:
            self._last_remember = now
            self._remember()

    def _remembered(self) -> list[str]:
        """Peers alive when this node last ran: dialed again at start, so a node that knew nobody
        (no bootstrap) finds its cluster again after a restart even if no peer dials it."""
        if self._peers_file is None:
            return []
        try:
            endpoints = json.loads(self._peers_file.read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(endpoints, list):
            return []
        return [e for e in endpoints if isinstance(e, str) and e.startswith("tcp://")][:MAX_REMEMBERED]

    def _remember(self) -> None:
        if self._peers_file is None:
            return
        alive = sorted(m.gossip for m in self.m.members.values() if m.state == "alive" and m.gossip)
        if not alive or alive == self._peers_saved:
            return  # keep the last non-empty list: a node alone now still wants its old peers later
        try:
            tmp = self._peers_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(alive[:MAX_REMEMBERED]))
            os.replace(tmp, self._peers_file)
            self._peers_saved = alive
        except OSError as e:
            log.warning("cannot remember peers in %s: %s", self._peers_file, e)

    def _apply(self, ch: Changes) -> None:
        if not ch:
            return
        for endpoint in ch.disconnect:
            self._undial(endpoint, "peer")
        for endpoint in ch.connect:
            self._dial(endpoint, "peer")
        now = time.monotonic()
        for node_id, source in ch.wants.items():
            self._wants[node_id] = (source, 0.0)
        for node_id, old, new in ch.transitions:
            level = logging.INFO if new != "alive" or old != "alive" else logging.DEBUG
            log.log(level, "peer %s: %s -> %s", node_id, old, new)
            if new in ("left", "removed", "revoked"):
                self._wants.pop(node_id, None)
                self.trust.forget(node_id)
            elif new == "alive" and old in ("dead", "removed"):
                self._redial_now(node_id)
        for node_id in ch.updated:
            if node_id in self._wants:
                del self._wants[node_id]
        if self._on_change is not None:
            members = self.m.members.values()
            self._on_change([m.record for m in members if m.record is not None],
                            {i: m.state for i, m in self.m.members.items()})
        self._ask(now=now)
        notify(self._listeners, "ledger_changed")

    def _ask(self, force: bool = False, now: float | None = None) -> None:
        now = now if now is not None else time.monotonic()
        by_peer: dict[str, list[str]] = {}
        for node_id, (source, last) in list(self._wants.items()):
            if force or now - last >= WANT_RETRY_S:
                by_peer.setdefault(source, []).append(node_id)
                self._wants[node_id] = (source, now)
        for peer, ids in by_peer.items():
            self._send(peer.encode(), wire.Want(ids))

    def _dial(self, endpoint: str, reason: str) -> None:
        if endpoint in self._self_endpoints or self._loop is None:
            return
        reasons = self._dialed.setdefault(endpoint, set())
        if not reasons:
            log.debug("dialing %s (%s)", endpoint, reason)
            self._loop.submit(lambda: self._pub.connect(endpoint))
        reasons.add(reason)

    def _redial_now(self, node_id: str) -> None:
        """A node long silent is heard again: a partition healed. If our own link to it is still
        down, dial it again now rather than at ZeroMQ's next attempt (up to a second away, more
        while the kernel resolves its address): its side's link came up first, so ours is
        likely up too, and each side then lists the other as soon as the first link is up."""
        m = self.m.members.get(node_id)
        endpoint = m.gossip if m is not None else ""
        if not endpoint or endpoint not in self._dialed or endpoint in self._links_up or self._loop is None:
            return
        self._stats.inc("gossip_redials")

        def _again() -> None:
            self._disconnect(endpoint)
            self._pub.connect(endpoint)
        self._loop.submit(_again)

    def _undial(self, endpoint: str, reason: str) -> None:
        reasons = self._dialed.get(endpoint)
        if reasons is None or self._loop is None:
            return
        reasons.discard(reason)
        if not reasons:
            del self._dialed[endpoint]
            self._links_up.discard(endpoint)
            self._loop.submit(lambda: self._disconnect(endpoint))

    def _disconnect(self, endpoint: str) -> None:
        """io thread: stop dialling ``endpoint`` (not dialled any more: nothing to do)."""
        try:
            self._pub.disconnect(endpoint)
        except zmq.ZMQError:
            pass

    def _send(self, topic: bytes, body: wire.Body) -> None:
        if self._loop is None:
            return
        payload = wire.encode(self._net, self.m.own.id, body)
        stats = self._stats

        def _out() -> None:
            try:
                self._pub.send_multipart([topic, payload], zmq.NOBLOCK)
                stats.inc("gossip_out")
                stats.inc("gossip_out_bytes", len(topic) + len(payload))
            except zmq.Again:
                stats.inc("gossip_out_dropped")
        self._loop.submit(_out)

    def on_stop(self) -> None:
        """Tell everyone we leave, give the Leave ``LEAVE_LINGER_MS`` to flush, and close."""
        if self._loop is None:
            return
        self._remember()
        self._send(wire.TOPIC_ALL, self.m.leave())

        def _quiet() -> None:
            for sock in (self._pub, self._sub):
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
        self._loop.submit(_quiet)
        if not self._loop.stop(linger_ms=LEAVE_LINGER_MS):
            log.error("ledger socket thread did not stop")
        self._loop = None

    def release(self) -> None:
        """On a death (a stop is on_stop's, with the Leave): the io thread closes the sockets and ends."""
        if self._loop is not None:
            self._loop.stop()
            self._loop = None


def _member(r: wire.NodeRecord, state: str) -> dict[str, Any]:
    """A member as the operator's client sees it (rotation_info)."""
    return {"id": r.id, "name": r.name, "role": r.role, "key": r.key.hex(), "curve": r.curve, "state": state}
