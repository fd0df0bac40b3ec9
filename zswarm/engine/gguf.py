"""Reading a GGUF file's header: the model's layer count, without loading the model.

Owns :func:`gguf_block_count` and the few GGUF type codes it needs. Pure Python (``struct``);
it must never import llama_cpp or ggml, and it reads only as far into the file as the key it wants.
"""

from __future__ import annotations

import os
import struct

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

        unpack("Q")  # the tensor count, not needed here
        n_kv = unpack("Q")
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
