"""Loading the model: the one place a ``Llama`` is built, locally or across llama.cpp RPC servers.

Owns :class:`LoadSpec` and :func:`load_model`, the ``Llama`` subclass every slot runs
(:class:`_Model`: exact usage counts, a stop between tokens, a count of evaluated tokens for the
heartbeat, the device list in the model params), registering RPC servers with ggml
(:func:`rpc_device`), and reading llama.cpp's load log (:class:`LlamaLog`) to learn where the
layers went. Layer arithmetic is :mod:`.layers`'s and the
GGUF header :mod:`.gguf`'s. It must never touch the socket or the queue; a failed load is a
:class:`LoadError`, never an exit.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import re
import socket
import threading
from dataclasses import dataclass
from typing import Sequence

import llama_cpp
import numpy as np
from llama_cpp._logger import llama_log_callback as llama_cpp_python_log  # the callback to put back

from .ggml import GGML_BACKEND_DEVICE_TYPE_CPU, device_memory, ggml
from .gguf import gguf_block_count
from .layers import assign_layers, layer_targets, output_device, split_for_counts
from .scheduler import Job

log = logging.getLogger("zswarm.engine")

RPC_PROBE_TIMEOUT_S = 3.0  # a worker that does not accept a TCP connection in this time is down
LOCAL = "local"  # the LAYERS key for this machine's CPU


class ContextTooLong(Exception):
    def __init__(self, prompt_tokens: int, n_ctx: int):
        super().__init__(f"the prompt is {prompt_tokens} tokens; this model's context holds {n_ctx} "
                         f"(prompt tokens must be fewer than {n_ctx})")


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
    evaluated = 0  # tokens through llama_decode so far, prompts and generation: the beat's progress
    layers: dict[str, int] | None = None  # worker mode: repeating layers per device (load_model)
    buffers: dict[str, int] | None = None  # worker mode: bytes llama.cpp allocated per device (load_model)
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

    def eval(self, tokens):  # type: ignore[override]
        # Batch by batch, as Llama.eval does itself, so a long prompt moves the count between
        # batches (the supervisor tells a slow prompt from a stuck one by it). Only the slot's
        # own thread writes it; the beat thread reads it.
        for i in range(0, len(tokens), self.n_batch):
            batch = tokens[i:i + self.n_batch]
            super().eval(batch)
            self.evaluated += len(batch)

    def create_completion(self, prompt, *args, **kwargs):  # type: ignore[override]
        if isinstance(prompt, list):
            n = len(prompt)
        else:  # the same special-token handling as Llama._create_completion's prompt
            n = len(self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
        if n >= self.n_ctx():
            raise ContextTooLong(n, self.n_ctx())
        return super().create_completion(prompt, *args, **kwargs)

    # The prompt cache (llama-cpp-python's LlamaRAMCache, set per slot by the engine): after each
    # request the slot's state is kept by its tokens, and a request that starts like one of them
    # gets it back instead of evaluating that prefix again. Llama.save_state also copies the
    # scores of the last n_batch positions (512 x n_vocab floats: 100 MB for SmolLM2) that a
    # restored state never reads (load_state marks it to be decoded again before sampling), and
    # the cache does not count them: these two keep the KV state alone.
    def save_state(self):  # type: ignore[override]
        size = llama_cpp.llama_state_get_size(self._ctx.ctx)
        buf = (ctypes.c_uint8 * int(size))()
        n = int(llama_cpp.llama_state_get_data(self._ctx.ctx, buf, size))
        if n > int(size):
            raise RuntimeError("llama_state_get_data wrote past its buffer")
        return llama_cpp.LlamaState(input_ids=self.input_ids.copy(), scores=_NO_SCORES, n_tokens=self.n_tokens,
                                    llama_state=bytes(memoryview(buf)[:n]), llama_state_size=n, seed=self._seed)

    def load_state(self, state) -> None:  # type: ignore[override]
        if state.scores is not _NO_SCORES:
            return super().load_state(state)
        buf = (ctypes.c_uint8 * state.llama_state_size).from_buffer_copy(state.llama_state)
        if llama_cpp.llama_state_set_data(self._ctx.ctx, buf, state.llama_state_size) != state.llama_state_size:
            raise RuntimeError("llama_state_set_data refused the saved state")
        self.input_ids = state.input_ids.copy()
        self.n_tokens = state.n_tokens
        self._requires_eval = True
        self._seed = state.seed

    def generate(self, tokens, *args, **kwargs):  # type: ignore[override]
        job = self.job
        assert job is not None
        job.prompt_tokens = len(tokens)
        job.check()
        vocab = self._model.vocab
        before, first = self.evaluated, True
        for token in super().generate(tokens, *args, **kwargs):
            if first:  # the prompt is evaluated, the first token sampled: what it did not evaluate was cached
                job.cached_tokens, first = max(0, len(tokens) - (self.evaluated - before)), False
            job.check()
            if not llama_cpp.llama_vocab_is_eog(vocab, token):
                job.completion_tokens += 1
            yield token


def json_grammar(schema: str) -> "llama_cpp.LlamaGrammar":
    """The llama.cpp grammar an answer must follow: any JSON object, or JSON valid against
    ``schema`` (JSON text). ValueError (the client's 400) for a schema it cannot be built from."""
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    try:
        if not schema:
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        return LlamaGrammar.from_json_schema(schema, verbose=False)
    except Exception as e:  # the converter raises what it likes on a schema it does not handle
        raise ValueError(f"response_format: no grammar can be built from this JSON schema ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None


_NO_SCORES = np.zeros((0, 0), dtype=np.single)  # a saved state without scores (see _Model.save_state)


class PromptCache(llama_cpp.LlamaRAMCache):
    """Saved prompt states shared by every slot of the engine, least recently used out first
    (``_Model.set_cache``): a state saved from one slot's context loads into another's (same
    model, same context size), so a conversation's next turn finds its prefix whichever slot
    takes it. Slots run in threads of their own, hence the lock (llama-cpp-python's cache has none)."""

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes=capacity_bytes)
        self._lock = threading.Lock()

    def __getitem__(self, key):
        with self._lock:
            return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        with self._lock:
            return super().__contains__(key)

    def __setitem__(self, key, value) -> None:
        with self._lock:
            super().__setitem__(key, value)


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
    def __init__(self, message: str, failed: Sequence[str] = ()):
        super().__init__(message)
        self.failed = tuple(failed)  # RPC servers that could not allocate their share (the RPCFAIL report)


def rpc_memory(endpoints: Sequence[str]) -> dict[str, list[int]]:
    """What each RPC server says it has: endpoint -> [free, total] bytes (the ``RPCMEM`` report).
    The server clamps each worker's memory claim to it (sharder.py)."""
    return {e: list(device_memory(rpc_device(e))) for e in endpoints}


# llama.cpp's words for an RPC server that could not allocate a buffer (weights: "unable to
# allocate RPC0[host:port] buffer"; compute buffers: "failed to allocate RPC0[host:port] buffer of size N")
_ALLOC_FAILED = re.compile(r"(?:unable|failed) to allocate RPC\d*\[([^\]]+)\] buffer")


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
            named = {m for _, text in llama_log.lines for m in _ALLOC_FAILED.findall(text)}
            failed = [e for e in spec.rpc_servers if e in named]
            raise LoadError(f"cannot load the model across {', '.join(spec.rpc_servers)}: {e}"
                            + (f" (llama.cpp: {why})" if why else "")
                            + (f"; could not allocate on {', '.join(failed)}" if failed else ""), failed) from None
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
    model.buffers = {(LOCAL if name == "CPU" else name): size
                     for name, size in llama_log.buffers().items()}  # what each device allocated
    if target is not None and [model.layers[k] for k in keys] != target:
        # e.g. the header's block count is not llama.cpp's n_layer (then n_layer is logged too)
        log.warning("llama.cpp placed the %d layers as %s, not as %s (wanted by %s)",
                    n_layer, [model.layers[k] for k in keys], target,
                    f"--tensor-split {list(spec.tensor_split)}" if spec.tensor_split else "free memory")
    if planned_output is not None and model.output != planned_output:
        log.warning("llama.cpp put the output layer on %s, not on %s: every token brings the logits "
                    "back over the network", model.output, planned_output)
    return model


# What prove() evaluates: about 60 tokens in any vocabulary, one batch, so the prompt-processing
# kernels (matrix-matrix, repacked weights) run as well as the one-token path of generation.
PROOF_TEXT = b" ".join([b"The quick brown fox jumps over the lazy dog."] * 6)
PROOF_TOKENS = 64


def prove(model: llama_cpp.Llama) -> None:
    """Run one real forward pass (a couple of prompt tokens) and forget it.

    A build that uses instructions this CPU cannot execute dies here, by SIGILL, before the
    engine says READY rather than at a user's first request (prompt and generation kernels both); in worker mode the pass crosses every
    RPC server, so a worker whose build cannot compute is caught too. Raises LoadError if the
    pass fails without killing the process.
    """
    tokens = model.tokenize(PROOF_TEXT, add_bos=True, special=False)[:min(PROOF_TOKENS, model.n_ctx() - 1)]
    try:
        model.eval(tokens)
    except (RuntimeError, ValueError) as e:
        raise LoadError(f"the model loaded but cannot compute: {e}") from None
    finally:
        model.reset()  # the next request starts from an empty context (eval drops the rest)


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


_ASSIGNED = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")
_LLAMA_ERROR = 3  # GGML_LOG_LEVEL_ERROR


# "load_tensors: RPC0[127.0.0.1:41853] model buffer size =    31.71 MiB", "llama_kv_cache:        CPU KV
# buffer size =     5.62 MiB", "sched_reserve:        CPU compute buffer size =    49.13 MiB"
_BUFFER = re.compile(r"(\w+)(?:\[([^\]]+)\])? +(?:model|KV|compute|output) buffer size = +([\d.]+) MiB")


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

    def buffers(self) -> dict[str, int]:
        """Bytes llama.cpp allocated per device (weights, KV cache, compute and output buffers
        together), by the names it logged: "CPU" (a mapped file counts as CPU), or an RPC
        server's "host:port"."""
        out: dict[str, int] = collections.Counter()
        for _, text in self.lines:
            m = _BUFFER.search(text)
            if m:
                name = m.group(2) or m.group(1).removesuffix("_Mapped")
                out[name] += int(float(m.group(3)) * (1 << 20))
        return dict(out)

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
