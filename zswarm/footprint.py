"""What loading a model takes, device by device: weights, KV cache and compute buffers, from the
GGUF header alone (no load). Pure logic apart from reading the header; the Sharder plans splits
with it (sharding.py), and the worker-mode benchmark and tests/test_footprint.py hold it against
what llama.cpp allocates.

The three parts, as llama.cpp (0.3.36) allocates them for one sequence:

- **weights**: each repeating layer's tensors (``blk.N.*``) live on the device that holds the
  layer; the rest (token embeddings, output norm and head) on the host, which holds the input and
  output layers in every zswarm split (engine/loading.py);
- **KV cache**: per layer, ``n_ctx × (n_embd_k_gqa + n_embd_v_gqa)`` f16 values, on the layer's
  device; llama.cpp rounds the context up to a multiple of 256;
- **compute buffers**: one per device, sized by the worst graph llama.cpp reserves (a micro-batch
  of ``n_ubatch = min(n_ctx, 512)`` tokens). They do not shrink with a device's share of the
  layers, which is why a split is planned on what each device has left after them. The sizes
  below are f32 counts per micro-batch token, fitted to the graph allocator's figures for the
  embedded model at contexts 256 to 8192 (tests/test_footprint.py checks 10% at 256, 2048 and
  8192, and the benchmark prints the comparison): a device's working set is the feed-forward and
  residual activations (``4·n_ff + 2·n_embd``) plus attention scores over the context
  (``n_ctx × (n_head + n_head_kv + 1)`` on an RPC device; a single CPU reuses more,
  ``n_ctx × (n_head + 1)``); the host's adds the logits (``n_vocab``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .engine.gguf import Header, read_header

MIB = 1 << 20
N_BATCH = 512  # llama-cpp-python's default n_batch; n_ubatch = min(n_ctx, n_batch)
KV_PAD = 256  # llama.cpp rounds the KV cache's context up to a multiple of this
_F32, _F16 = 4, 2
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class Shape:
    """The model dimensions the buffers depend on."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    kv_width: int  # n_embd_k_gqa + n_embd_v_gqa

    @classmethod
    def of(cls, h: Header) -> Shape:
        def num(name: str, default: int | None = None) -> int:
            v = h.arch_key(name, default)
            if isinstance(v, list):  # per-layer values (some architectures): the widest
                v = max(v) if v else default
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"the GGUF header has no usable {name} ({v!r})")
            return v

        n_embd, n_head = num("embedding_length"), num("attention.head_count")
        n_head_kv = num("attention.head_count_kv", n_head)
        head_k = num("attention.key_length", n_embd // max(1, n_head))
        head_v = num("attention.value_length", head_k)
        vocab = h.arch_key("vocab_size") or h.keys.get("tokenizer.ggml.tokens")
        return cls(num("block_count"), n_embd, num("feed_forward_length", 4 * n_embd), n_head, n_head_kv,
                   vocab if isinstance(vocab, int) else 0, n_head_kv * (head_k + head_v))


@dataclass(frozen=True)
class Footprint:
    """Bytes a load of one model at one context takes, by part and device."""

    shape: Shape
    ctx: int
    layer_weights: tuple[int, ...]  # bytes of each repeating layer's tensors
    host_weights: int  # the tensors outside the repeating layers (embeddings, output head)

    @property
    def ubatch(self) -> int:
        return min(self.ctx, N_BATCH)

    @property
    def kv_per_layer(self) -> int:
        return -(-self.ctx // KV_PAD) * KV_PAD * self.shape.kv_width * _F16

    @property
    def kv(self) -> int:
        return self.kv_per_layer * self.shape.n_layer

    @property
    def weights(self) -> int:
        return sum(self.layer_weights) + self.host_weights

    def _working_set(self) -> int:  # f32 values per micro-batch token, context aside
        return 4 * self.shape.n_ff + 2 * self.shape.n_embd

    def device_compute(self) -> int:
        """An RPC device's compute buffer (the same whatever its share of the layers)."""
        s = self.shape
        return _F32 * self.ubatch * (self._working_set() + self.ctx * (s.n_head + s.n_head_kv + 1))

    def host_compute(self) -> int:
        """The host's compute buffer in a split: the logits, plus its part of the graph."""
        s = self.shape
        return _F32 * self.ubatch * (s.n_vocab + self._working_set() + self.ctx * (s.n_head_kv + 1))

    def single_compute(self) -> int:
        """One CPU holding everything: the logits stage or the attention stage, whichever is larger."""
        s = self.shape
        return _F32 * self.ubatch * (self._working_set() + max(s.n_vocab, self.ctx * (s.n_head + 1)))

    def output_buffer(self) -> int:
        return _F32 * self.shape.n_vocab  # one sequence's logits

    def layers_bytes(self, first: int, count: int) -> int:
        """Weights and KV cache of ``count`` layers from ``first``."""
        return sum(self.layer_weights[first:first + count]) + count * self.kv_per_layer

    def single(self) -> int:
        """The whole model on one CPU."""
        return self.weights + self.kv + self.single_compute() + self.output_buffer()

    def parts(self) -> str:
        return (f"weights {self.weights / MIB:.0f} MiB, KV cache {self.kv / MIB:.0f} MiB, "
                f"compute {self.device_compute() / MIB:.0f} MiB per worker")


def footprint(path: str, ctx: int) -> Footprint:
    """Read ``path``'s header (ValueError or OSError if it cannot be read as a GGUF model)."""
    h = read_header(path)
    shape = Shape.of(h)
    per_layer = [0] * shape.n_layer
    host = 0
    for t in h.tensors:
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) < shape.n_layer:
            per_layer[int(m.group(1))] += t.nbytes
        else:
            host += t.nbytes
    return Footprint(shape, ctx, tuple(per_layer), host)
