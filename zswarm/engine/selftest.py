"""One small ggml graph on the CPU device: the RPC server's proof that this build computes here.

A worker's RPC server never loads a model, so it cannot prove itself the way the engine does
(one forward pass). Instead it runs what a split model will ask of it: matrix products of the
weight types common in GGUF files (F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) with F32 activations, as a
single token and as a batch, on the same CPU device it then lends. A build that uses
instructions this machine cannot execute dies here, by SIGILL, before READY.

Through ctypes on the libraries in llama-cpp-python's folder (:func:`.ggml.lib_dir`), like
:mod:`.ggml`; it must never import llama_cpp. Data is all zeros: the kernels run the same
instructions whatever the numbers are.
"""

from __future__ import annotations

import ctypes
import os

from .ggml import lib_dir

# enum ggml_type (ggml.h; part of the GGUF format, so these numbers never change)
WEIGHT_TYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
GGML_TYPE_F32 = 0
GGML_STATUS_SUCCESS = 0
ROW = 256  # elements per row: a multiple of every block size above (K-quants: 256)
ROWS = 16  # output rows
BATCHES = (1, 8)  # a token being generated, and a short prompt


class _InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _lib():
    base = ctypes.CDLL(os.path.join(lib_dir(), "libggml-base.so"))
    vp, sz, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
    sigs = {
        "ggml_tensor_overhead": (sz,), "ggml_graph_overhead": (sz,),
        "ggml_init": (vp, _InitParams), "ggml_free": (None, vp),
        "ggml_new_tensor_2d": (vp, vp, ctypes.c_int, i64, i64), "ggml_mul_mat": (vp, vp, vp, vp),
        "ggml_new_graph": (vp, vp), "ggml_build_forward_expand": (None, vp, vp),
        "ggml_backend_dev_init": (vp, vp, ctypes.c_char_p), "ggml_backend_free": (None, vp),
        "ggml_backend_alloc_ctx_tensors": (vp, vp, vp), "ggml_backend_buffer_free": (None, vp),
        "ggml_backend_graph_compute": (ctypes.c_int, vp, vp),
        "ggml_backend_buffer_clear": (None, vp, ctypes.c_uint8),
    }
    for name, (restype, *argtypes) in sigs.items():
        fn = getattr(base, name)
        fn.restype, fn.argtypes = restype, argtypes
    return base


def compute_on(device: int) -> list[str]:
    """Run the graph on ggml device ``device``; returns the weight types it computed.

    Raises RuntimeError if ggml refuses (no backend, no memory, a failed compute).
    """
    g = _lib()
    n_tensors = len(WEIGHT_TYPES) * (1 + 2 * len(BATCHES))
    params = _InitParams(g.ggml_tensor_overhead() * (n_tensors + 4) + g.ggml_graph_overhead(), None, True)
    ctx = g.ggml_init(params)
    if not ctx:
        raise RuntimeError("ggml_init failed")
    backend = buf = None
    try:
        graph = g.ggml_new_graph(ctx)
        for wtype in WEIGHT_TYPES.values():
            w = g.ggml_new_tensor_2d(ctx, wtype, ROW, ROWS)
            for n in BATCHES:
                x = g.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ROW, n)
                g.ggml_build_forward_expand(graph, g.ggml_mul_mat(ctx, w, x))
        backend = g.ggml_backend_dev_init(device, None)
        if not backend:
            raise RuntimeError("the device has no backend")
        buf = g.ggml_backend_alloc_ctx_tensors(ctx, backend)
        if not buf:
            raise RuntimeError("cannot allocate the test tensors")
        g.ggml_backend_buffer_clear(buf, 0)
        status = g.ggml_backend_graph_compute(backend, graph)
        if status != GGML_STATUS_SUCCESS:
            raise RuntimeError(f"the test graph failed (ggml status {status})")
        return list(WEIGHT_TYPES)
    finally:
        if buf:
            g.ggml_backend_buffer_free(buf)
        if backend:
            g.ggml_backend_free(backend)
        g.ggml_free(ctx)
