"""Depot actor: the model files this node holds, announced to the cluster, and the fetch of one
it lacks, from the peers that hold it.

Threads:
- the actor's own: ledger events, the admin's ``models`` and ``pull``, what the io thread reports;
  it announces ``holdings`` in the node's record and offers whole files to the :class:`Shelf`;
- ``depot-io`` (a :class:`~zswarm.transport.SocketLoop`): owns the fetch socket (one ROUTER,
  CURVE client with this node's own key, one connection per holder's gateway, named by its
  endpoint), the partial file and the :class:`~.plan.FetchPlan`. Nothing else touches them;
- ``depot-hash``, short-lived: the fingerprint of the file this node serves (a minute for a
  40 GB file, so never in the actor).

A fetch: resolve the name (or digest) to a digest from peers' holdings, ask one holder for the
manifest, ask every holder for pieces, check each piece against the manifest and write it in
place, note what is on disk every second (so a restart resumes), and check the whole file
against the digest before renaming it into place. A holder whose manifest does not add up to
the digest is not asked again.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pykka
import zmq

from .. import wire
from ..actors.base import GuardedActor, Watch
from ..actors.listener import tell
from ..engine.model import model_name
from ..token import Keys
from ..transport import SocketLoop, Stats, curve_client, link_options
from .digest import DigestCache, Fingerprint, file_sha256, is_sha256
from .plan import CORRUPT, OK, FetchPlan
from .shelf import Shelf
from .store import Held, ModelsDir, StoreFull
from .target import MAX_NAME

log = logging.getLogger(__name__)

TICK_S = 0.05
REPORT_EVERY_S = 0.5  # progress from the io thread to the actor
ANNOUNCE_EVERY_S = 1.0  # progress in this node's record at most this often
SAVE_EVERY_S = 0.5  # which pieces are on disk, for a restart
MANIFEST_TIMEOUT_S = 5.0
UNREACHABLE_PAUSE_S = 0.2
NOT_MEMBER_WAIT_S = 0.5  # a holder that does not know us yet (our record is on its way)
MAX_REPLY_BYTES = 64 << 20  # a piece of at most 1 MiB (files under 64 GiB), a manifest of ~2 MB
ASK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Holder:
    node: str  # id
    name: str
    endpoint: str  # its gateway
    curve: str  # its own CURVE key


@dataclass
class Job:
    """The fetch in hand (actor thread)."""

    target: str  # what was asked for: a model name or a digest
    sha256: str = ""  # resolved
    name: str = ""
    size: int = 0
    state: str = "waiting"  # waiting (for a holder) | fetching | whole | failed
    have: int = 0
    rate: float = 0.0  # bytes per second lately
    peers: dict[str, int] = field(default_factory=dict)  # holder name -> good pieces in this fetch
    problem: str = ""
    started: float = field(default_factory=time.monotonic)
    logged_tenth: int = -1


class _Hashed:
    def __init__(self, held: list[tuple[Held, Fingerprint]]):
        self.held = held


class _Progress:
    def __init__(self, have: int, rate: float, peers: dict[str, int]):
        self.have, self.rate, self.peers = have, rate, peers


class _Whole:
    def __init__(self, held: Held, fp: Fingerprint):
        self.held, self.fp = held, fp


class _Failed:
    def __init__(self, why: str):
        self.why = why


class _Liar:
    def __init__(self, node: str, why: str):
        self.node, self.why = node, why


class DepotActor(GuardedActor):
    name = "depot"

    def __init__(self, ctx: zmq.Context, keys: Keys, own: tuple[bytes, bytes], node_id: str,
                 models: ModelsDir, digests: DigestCache, stats: Stats, ledger: Any,
                 shelf: Shelf | None = None, served: str | None = None,
                 on_whole: Callable[[str], None] | None = None,
                 on_progress: Callable[[str], None] | None = None, watch: Watch | None = None):
        super().__init__(watch)
        self._ctx, self._keys, self._own, self._node_id = ctx, keys, own, node_id
        self._models, self._digests, self._stats, self._ledger = models, digests, stats, ledger
        self._shelf = shelf
        self._served = served  # the file this node serves, if it was given one
        self._on_whole = on_whole or (lambda path: None)
        self._on_progress = on_progress or (lambda problem: None)
        self._held: dict[str, tuple[Held, Fingerprint]] = {}  # sha256 -> whole file here
        self._job: Job | None = None
        self._liars: dict[str, str] = {}  # node id -> why it is not asked again
        self._announced_at = 0.0
        self._loop: SocketLoop | None = None
        # io-thread state
        self._io = _Io(self)

    # --- actor thread ---
    def on_start(self) -> None:
        self._models.ensure()
        loop = SocketLoop("depot-io", self._ctx, self._io.setup, TICK_S, self._io.tick)
        loop.start_and_wait()
        self._loop = loop
        threading.Thread(target=self._hash_all, name="depot-hash", daemon=True).start()

    def _hash_all(self) -> None:
        """The depot-hash thread: fingerprints of the served file and of the whole files fetched."""
        found = []
        paths = [(None, self._served)] if self._served else []
        paths += [(h, h.path) for h in self._models.whole()]
        for held, path in paths:
            try:
                fp = self._digests.get(path)
            except OSError as e:
                log.warning("cannot read %s to share it: %s", path, e.strerror)
                continue
            if held is None:
                held = Held(model_name(path), fp.sha256, fp.size, path)
            elif held.sha256 != fp.sha256:  # a file in the models directory changed under us
                log.warning("%s does not match its digest any more; not shared", path)
                continue
            found.append((held, fp))
        tell(self.actor_ref, _Hashed(found))

    def handle(self, message: Any) -> None:
        match message:
            case _Hashed(held=held):
                for h, fp in held:
                    self._held[h.sha256] = (h, fp)
                self._offer()
                self._announce(force=True)
            case _Progress() as p:
                self._progress(p)
            case _Whole(held=h, fp=fp):
                self._whole(h, fp)
            case _Failed(why=why):
                j = self._job
                if j is not None and j.state == "fetching":
                    j.state, j.problem = "failed", why
                    log.error("cannot fetch model %s: %s", j.name or j.target, why)
                    self._on_progress(f"cannot fetch model {j.name or j.target}: {why}")
                    self._announce(force=True)
            case _Liar(node=node, why=why):
                self._liars[node] = why
                log.warning("model fetch: node %s is not asked again: %s", node, why)
                self._resolve()
            case _:
                super().handle(message)

    def on_ledger_changed(self) -> None:
        self._resolve()

    def want(self, target: str) -> dict[str, Any]:
        """Fetch ``target`` (a model name or a SHA-256) from peers, unless it is here already.
        Returns the fetch's status. ValueError if another fetch is in hand."""
        target = target.strip().lower().removeprefix("sha256:")
        if not target or len(target) > MAX_NAME:
            raise ValueError(f"a model name is 1 to {MAX_NAME} characters")
        here = self.whole_file(target)
        if here is not None:
            return {"state": "whole", "target": target, "path": here}
        busy = self._job is not None and self._job.state in ("waiting", "fetching")
        if busy and self._job.target != target:
            raise ValueError(f"already fetching {self._job.target}; one fetch at a time")
        if not busy:
            self._job = Job(target)
            log.info("model %s is not on this machine: fetching it from peers", target)
        self._resolve()
        return self.fetch_status()

    def whole_file(self, target: str) -> str | None:
        """The path of a whole file here named ``target`` (name or digest), or None."""
        for h, _ in self._held.values():
            if target in (h.sha256, h.name):
                return h.path
        held = self._models.find(target)
        return held.path if held is not None else None

    def fetch_status(self) -> dict[str, Any]:
        j = self._job
        if j is None:
            return {"state": "none"}
        out = {"state": j.state, "target": j.target, "name": j.name, "sha256": j.sha256, "size": j.size,
               "have": j.have, "percent": round(100 * j.have / j.size, 1) if j.size else 0.0,
               "rate_bytes_s": round(j.rate), "peers": dict(j.peers), "problem": j.problem}
        if self._liars:
            out["not_asked"] = dict(self._liars)
        return out

    def holdings(self) -> list[wire.Holding]:
        out = [wire.Holding(h.name, h.sha256, h.size, h.size) for h, _ in self._held.values()]
        j = self._job
        if j is not None and j.sha256 and j.state == "fetching" and j.sha256 not in self._held:
            out.append(wire.Holding(j.name, j.sha256, j.size, j.have))
        return sorted(out, key=lambda h: (h.name, h.sha256))

    def models(self) -> list[dict[str, Any]]:
        """Every model file in the cluster: where each copy is and how complete (admin ``models``)."""
        own = self._ledger.own().get(timeout=ASK_TIMEOUT_S)
        views = [{"id": own.id, "name": own.name, "state": "self", "models": list(own.models),
                  "holdings": [{"name": h.name, "sha256": h.sha256, "size": h.size, "have": h.have}
                               for h in own.holdings]}]
        views += self._ledger.peers().get(timeout=ASK_TIMEOUT_S)
        files: dict[tuple[str, str], dict[str, Any]] = {}
        for v in views:
            for h in v.get("holdings", []):
                f = files.setdefault((h["name"], h["sha256"]), {"name": h["name"], "sha256": h["sha256"],
                                                                 "size": h["size"], "copies": []})
                f["copies"].append({"node": v["id"], "node_name": v["name"], "state": v["state"],
                                    "have": h["have"], "percent": round(100 * h["have"] / h["size"], 1)
                                    if h["size"] else 0.0, "serving": h["name"] in v.get("models", [])})
        return sorted(files.values(), key=lambda f: (f["name"], f["sha256"]))

    def release(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    # --- the actor's own steps ---
    def _offer(self) -> None:
        if self._shelf is not None:
            self._shelf.offer({sha: (h.path, fp) for sha, (h, fp) in self._held.items()})

    def _announce(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._announced_at < ANNOUNCE_EVERY_S:
            return
        self._announced_at = now
        try:
            self._ledger.update_own(holdings=self.holdings())  # not waited for
        except pykka.ActorDeadError:
            pass

    def _holders(self) -> list[tuple[wire.Holding, Holder]]:
        """Whole copies that alive peers with a gateway announce, liars left out."""
        out = []
        for p in self._ledger.peers().get(timeout=ASK_TIMEOUT_S):
            gateway = p["endpoints"].get("gateway", "")
            # a suspect holder stays (a busy link makes one suspect for a moment); a dead one goes
            if p["state"] not in ("alive", "suspect") or not gateway.startswith("tcp://") or p["id"] in self._liars:
                continue
            for h in p.get("holdings", []):
                if (h["have"] == h["size"] > 0 and is_sha256(h["sha256"])
                        and isinstance(h["name"], str) and len(h["name"]) <= MAX_NAME):
                    out.append((wire.Holding(h["name"], h["sha256"], h["size"], h["have"]),
                                Holder(p["id"], p["name"], gateway, p.get("curve", ""))))
        return out

    def _resolve(self) -> None:
        """Which file the job is, and who holds it: handed to the io thread."""
        j = self._job
        if j is None or j.state in ("whole", "failed"):
            return
        wanted = (lambda h: h.sha256 == j.sha256) if j.sha256 else (lambda h: j.target in (h.sha256, h.name))
        found = [(h, who) for h, who in self._holders() if wanted(h)]
        if not j.sha256:
            if not found:
                j.problem = f"no peer holds model {j.target} yet"
                self._on_progress(f"waiting for a peer that holds model {j.target}")
                return
            by_sha: dict[str, list] = {}
            for h, who in found:
                by_sha.setdefault(h.sha256, []).append((h, who))
            # the file most peers hold (then the smallest): two quantizations share a name
            sha = min(by_sha, key=lambda s: (-len(by_sha[s]), by_sha[s][0][0].size, s))
            h = by_sha[sha][0][0]
            try:
                self._models.check_room(h.size, self._partial_bytes(sha, h.name))
            except StoreFull as e:
                j.state, j.problem = "failed", str(e)
                log.error("cannot fetch model %s: %s", j.target, e)
                self._on_progress(f"cannot fetch model {j.target}: {e}")
                return
            j.sha256, j.name, j.size, j.state, j.problem = sha, h.name, h.size, "fetching", ""
            found = by_sha[sha]
            log.info("fetching model %s (%s, %d bytes) from %s", j.name, sha[:12], j.size,
                     ", ".join(who.name or who.node for _, who in found))
            self._submit(lambda job=(sha, h.name, h.size): self._io.start(*job))
        holders = [who for _, who in found]
        j.problem = "" if holders else f"no peer that holds model {j.name} is reachable"
        self._submit(lambda: self._io.set_holders(holders))

    def _partial_bytes(self, sha: str, name: str) -> int:
        try:
            return os.path.getsize(self._models.part_path(sha, name))
        except OSError:
            return 0

    def _progress(self, p: _Progress) -> None:
        j = self._job
        if j is None or j.state != "fetching":
            return
        j.have, j.rate, j.peers = p.have, p.rate, p.peers
        tenth = int(10 * j.have / j.size) if j.size else 0
        if tenth != j.logged_tenth:
            j.logged_tenth = tenth
            log.info("fetching model %s: %d%% (%.1f MB/s from %s)", j.name, 100 * j.have // max(j.size, 1),
                     j.rate / 1e6, ", ".join(f"{n}: {c} pieces" for n, c in sorted(j.peers.items())) or "nobody yet")
        self._on_progress(f"fetching model {j.name} from peers: {100 * j.have // max(j.size, 1)}%")
        self._announce()

    def _whole(self, held: Held, fp: Fingerprint) -> None:
        j = self._job
        if j is not None and j.sha256 == held.sha256:
            j.state, j.have, j.problem = "whole", j.size, ""
            log.info("model %s fetched and verified (sha256 %s) in %.1f s: %s", held.name, held.sha256[:12],
                     time.monotonic() - j.started, held.path)
        self._held[held.sha256] = (held, fp)
        self._offer()
        self._announce(force=True)
        self._on_whole(held.path)

    def _submit(self, fn: Callable[[], None]) -> None:
        if self._loop is not None:
            self._loop.submit(fn)


class _Io:
    """The depot-io thread's state: the fetch socket, the partial file and the plan."""

    def __init__(self, actor: DepotActor):
        self.a = actor
        self.job: tuple[str, str, int] | None = None  # sha256, name, size
        self.fd: int | None = None
        self.plan: FetchPlan | None = None
        self.saved_fp: Fingerprint | None = None
        self.saved_done: set[int] = set()
        self.holders: dict[str, Holder] = {}  # endpoint -> holder
        self.links: set[str] = set()
        self.manifest_from: tuple[str, float] | None = None  # (endpoint, when asked)
        self.manifest_source = ""  # endpoint whose manifest the plan follows
        self.manifest_tried: set[str] = set()
        self.ids = itertools.count()
        self.dirty = False
        self.saved_at = self.reported_at = 0.0
        self.window_bytes: list[tuple[float, int]] = []

    def setup(self, loop: SocketLoop) -> None:
        self.loop = loop
        self.out = link_options(loop.socket(zmq.ROUTER, self.on_reply))
        self.out.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        self.out.rcvhwm = 64
        curve_client(self.out, self.a._keys, self.a._own)
        self.out.router_mandatory = True

    # --- from the actor ---
    def start(self, sha: str, name: str, size: int) -> None:
        if self.job is not None and self.job[0] == sha:
            return
        self.close_file()
        self.job, self.plan, self.manifest_source, self.manifest_tried = (sha, name, size), None, "", set()
        models = self.a._models
        part = models.part_path(sha, name)
        try:
            models.folder(sha).mkdir(parents=True, exist_ok=True)
            self.fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, size)
        except OSError as e:
            self.fail(f"cannot write {part}: {e.strerror}")
            return
        self.saved_fp, self.saved_done = models.load_progress(sha)
        if self.saved_done:
            log.info("model %s: resuming a fetch with %d of %d pieces on disk", name, len(self.saved_done),
                     self.saved_fp.count)

    def set_holders(self, holders: list[Holder]) -> None:
        wanted = {h.endpoint: h for h in holders}
        for ep in self.links - set(wanted):
            self.links.discard(ep)
            try:
                self.out.disconnect(ep)
            except zmq.ZMQError:
                pass
            if self.plan is not None:
                self.plan.remove_peer(ep)
        for ep, h in wanted.items():
            if ep not in self.links:
                try:
                    self.out.curve_serverkey = h.curve.encode() or self.a._keys.curve_public
                    self.out.setsockopt(zmq.CONNECT_ROUTING_ID, ep.encode())
                    self.out.connect(ep)
                except zmq.ZMQError as e:
                    log.warning("model fetch: cannot connect to %s: %s", ep, e)
                    continue
                self.links.add(ep)
            if self.plan is not None:
                self.plan.add_peer(ep)
        self.holders = {ep: h for ep, h in wanted.items() if ep in self.links}

    # --- the loop ---
    def tick(self) -> None:
        if self.job is None or self.fd is None:
            return
        now = time.monotonic()
        if self.plan is None:
            self.ask_manifest(now)
            return
        self.plan.expire(now)
        for ep in list(self.plan.peers):
            while (index := self.plan.next(ep, now)) is not None:
                if not self.send(ep, wire.PieceQuery(self.next_id(), self.job[0], index)):
                    self.plan.deferred(ep, index, UNREACHABLE_PAUSE_S, now)
                    break
        if self.dirty and now - self.saved_at >= SAVE_EVERY_S:
            self.save(now)
        if now - self.reported_at >= REPORT_EVERY_S:
            self.report(now)
        if self.plan.complete:
            self.finish()

    def ask_manifest(self, now: float) -> None:
        if self.manifest_from is not None and now - self.manifest_from[1] < MANIFEST_TIMEOUT_S:
            return
        candidates = [ep for ep in sorted(self.holders) if ep not in self.manifest_tried] or sorted(self.holders)
        for ep in candidates:
            if self.send(ep, wire.ManifestQuery(self.next_id(), self.job[0])):
                self.manifest_from = (ep, now)
                self.manifest_tried.add(ep)
                return

    def send(self, ep: str, body: wire.Inference) -> bool:
        try:
            self.out.send_multipart([ep.encode(), wire.encode_inference(self.a._node_id, body)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # no connection to it yet (EHOSTUNREACH), or its queue is full
            return False

    def next_id(self) -> str:
        return format(next(self.ids), "x")

    def on_reply(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.a._stats.inc("depot_bad_frames")
            return
        ep = frames[0].decode(errors="replace")
        try:
            body = wire.decode_inference(frames[1]).body
        except wire.BadFrame:
            self.a._stats.inc("depot_bad_frames")
            return
        if self.job is None or ep not in self.holders:
            return
        match body:
            case wire.Manifest() as m:
                self.on_manifest(ep, m)
            case wire.Piece() as p if self.plan is not None and p.sha256 == self.job[0]:
                self.on_piece(ep, p)
            case wire.Fail(code="no_node"):  # it has not heard of us yet: the manifest again soon
                if self.manifest_from is not None and self.manifest_from[0] == ep:
                    self.manifest_from = (ep, time.monotonic() - MANIFEST_TIMEOUT_S + NOT_MEMBER_WAIT_S)
                    self.manifest_tried.discard(ep)
            case wire.Fail(code=code, message=message):
                log.warning("model fetch: %s refused: %s", self.name_of(ep), message)
                if code == "model_not_found":
                    if self.plan is not None:
                        self.plan.drop(ep)
                    self.manifest_from = None
            case _:
                self.a._stats.inc("depot_bad_frames")

    def on_manifest(self, ep: str, m: wire.Manifest) -> None:
        if self.plan is not None or self.manifest_from is None or self.manifest_from[0] != ep:
            return
        self.manifest_from = None
        sha, name, size = self.job
        fp = Fingerprint(m.sha256, m.size, m.piece_bytes, tuple(m.pieces))
        if m.sha256 != sha or m.size != size or not fp.consistent():
            self.liar(ep, "its manifest does not describe the file it announces")
            return
        done = set()
        if self.saved_fp is not None:  # what is on disk counts where it matches this manifest
            done = {i for i in self.saved_done if i < fp.count and i < self.saved_fp.count
                    and self.saved_fp.pieces[i] == fp.pieces[i]}
        self.plan = FetchPlan(fp, done)
        self.manifest_source = ep
        for peer in self.holders:
            self.plan.add_peer(peer)
        self.dirty = True

    def on_piece(self, ep: str, p: wire.Piece) -> None:
        now = time.monotonic()
        if p.wait_s > 0:
            self.plan.deferred(ep, p.index, p.wait_s, now)
            return
        verdict = self.plan.arrived(ep, p.index, p.data)
        if verdict == OK:
            offset, _ = self.plan.fp.piece_range(p.index)
            try:
                os.pwrite(self.fd, p.data, offset)
            except OSError as e:  # a full disk, most likely: nothing gained by going on
                self.plan.forget({p.index})
                self.fail(f"cannot write the model file: {e.strerror}")
                return
            self.dirty = True
            self.window_bytes.append((now, len(p.data)))
            self.a._stats.inc("depot_bytes_fetched", len(p.data))
            self.a._stats.inc("depot_pieces_fetched")
        elif verdict == CORRUPT:
            self.a._stats.inc("depot_pieces_corrupt")
            log.warning("model fetch: piece %d from %s does not match the manifest; asked of another peer",
                        p.index, self.name_of(ep))
            if ep in self.plan.dropped:
                self.liar(ep, "it served pieces that do not match the manifest")

    def fail(self, why: str) -> None:
        """The fetch cannot go on here (the disk): stop it, keep what is on disk for a later try."""
        if self.plan is not None and self.fd is not None:
            self.save(time.monotonic())
        self.close_file()
        self.job, self.plan = None, None
        self.set_holders([])
        tell(self.a.actor_ref, _Failed(why))

    def liar(self, ep: str, why: str) -> None:
        holder = self.holders.get(ep)
        if self.plan is not None:
            self.plan.drop(ep)
        self.holders.pop(ep, None)
        if holder is not None:
            tell(self.a.actor_ref, _Liar(holder.node, why))

    def name_of(self, ep: str) -> str:
        h = self.holders.get(ep)
        return (h.name or h.node) if h is not None else ep

    def save(self, now: float) -> None:
        self.saved_at, self.dirty = now, False
        try:
            os.fsync(self.fd)  # the pieces before the note that says they are there
            self.a._models.save_progress(self.plan.fp, self.plan.done)
        except OSError as e:
            log.warning("model fetch: cannot note its progress: %s", e)

    def report(self, now: float) -> None:
        self.reported_at = now
        self.window_bytes = [(t, n) for t, n in self.window_bytes if now - t < 3.0]
        span = max(now - self.window_bytes[0][0], REPORT_EVERY_S) if self.window_bytes else 1.0
        rate = sum(n for _, n in self.window_bytes) / span
        peers = {self.name_of(ep): p.pieces for ep, p in self.plan.peers.items()}
        tell(self.a.actor_ref, _Progress(self.plan.have_bytes, rate, peers))

    def finish(self) -> None:
        """Every piece is on disk: the whole file against the digest, then into place."""
        sha, name, size = self.job
        models = self.a._models
        part = models.part_path(sha, name)
        self.report(time.monotonic())
        os.fsync(self.fd)
        if file_sha256(str(part)) != sha:
            bad = self.recheck()
            if bad:  # our own disk lost them: fetch those again
                log.warning("model %s: %d pieces on disk are wrong; fetching them again", name, len(bad))
                self.plan.forget(bad)
                return
            # every piece matches the manifest, and the whole does not match the digest: the
            # manifest was a lie. Start again from another holder's (pieces that match it stay).
            self.saved_fp, self.saved_done = self.plan.fp, set(self.plan.done)
            self.liar(self.manifest_source, "its manifest does not add up to the digest it announces")
            self.plan = None
            return
        fp = self.plan.fp
        self.close_file()
        final = models.final_path(sha, name)
        os.replace(part, final)
        models.forget_progress(sha)
        self.a._digests.put(str(final), fp)
        self.job = None
        self.set_holders([])
        tell(self.a.actor_ref, _Whole(Held(name, sha, size, str(final)), fp))

    def recheck(self) -> set[int]:
        fp = self.plan.fp
        bad = set()
        for i in sorted(self.plan.done):
            offset, length = fp.piece_range(i)
            if hashlib.sha256(os.pread(self.fd, length, offset)).digest() != fp.pieces[i]:
                bad.add(i)
        return bad

    def close_file(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
