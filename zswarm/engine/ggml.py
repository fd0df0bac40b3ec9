"""The few ggml functions zswarm calls, bound through ctypes (:func:`ggml`).

Both the engine (to add RPC devices and pick the CPU device) and the RPC server (to serve this
machine's CPU) use them. The libraries are found in llama-cpp-python's folder without importing
it: this module must never import llama_cpp, so that a worker does not load libllama at all.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from types import SimpleNamespace

GGML_BACKEND_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type in ggml-backend.h


def lib_dir() -> str:
    """llama-cpp-python's ``lib`` folder, found without importing llama_cpp."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("llama-cpp-python is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "lib")


_ggml: SimpleNamespace | None = None
_ggml_lock = threading.Lock()


def ggml() -> SimpleNamespace:
    """The ggml functions zswarm calls, typed as in ggml-backend.h and ggml-rpc.h of llama.cpp
    0c1e570 (the headers llama-cpp-python 0.3.36 installs in site-packages/include).

    The libraries are opened by path from llama-cpp-python's own folder; the dynamic linker
    knows them by soname, so when libllama is (or was) loaded too, both see one device registry.
    """
    global _ggml
    with _ggml_lock:
        if _ggml is not None:
            return _ggml
        d = lib_dir()
        base = ctypes.CDLL(os.path.join(d, "libggml.so"))
        rpc = ctypes.CDLL(os.path.join(d, "libggml-rpc.so"))
        vp, sz, cs = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p

        def bind(lib, name, restype, *argtypes):
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = list(argtypes)
            return fn

        _ggml = SimpleNamespace(
            # ggml_backend_dev_t ggml_backend_dev_by_type(enum ggml_backend_dev_type type);
            dev_by_type=bind(base, "ggml_backend_dev_by_type", vp, ctypes.c_int),
            # const char * ggml_backend_dev_name(ggml_backend_dev_t device);
            dev_name=bind(base, "ggml_backend_dev_name", cs, vp),
            # void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total);
            dev_memory=bind(base, "ggml_backend_dev_memory", None, vp, ctypes.POINTER(sz), ctypes.POINTER(sz)),
            # void ggml_backend_register(ggml_backend_reg_t reg);
            register=bind(base, "ggml_backend_register", None, vp),
            # size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg);
            reg_dev_count=bind(base, "ggml_backend_reg_dev_count", sz, vp),
            # ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index);
            reg_dev_get=bind(base, "ggml_backend_reg_dev_get", vp, vp, sz),
            # ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);
            rpc_add_server=bind(rpc, "ggml_backend_rpc_add_server", vp, cs),
            # void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir,
            #     size_t n_threads, size_t n_devices, ggml_backend_dev_t * devices);
            rpc_start_server=bind(rpc, "ggml_backend_rpc_start_server", None, cs, cs, sz, sz,
                                  ctypes.POINTER(vp)),
        )
        return _ggml


def device_memory(dev: int) -> tuple[int, int]:
    """(free, total) bytes of a ggml device, as ggml reports them."""
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    ggml().dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value
