"""Reading a GGUF file's header: is it a model file at all, and its layer count, without loading it.

Owns :func:`check_model_file` (what the node and the engine ask before anything loads),
:func:`gguf_block_count`, :func:`read_header` (the metadata and tensor sizes, for the memory
estimate in :mod:`zswarm.footprint`) and the few GGUF type codes they need. Pure Python (``struct``); it must
never import llama_cpp or ggml, and it reads only as far into the file as the key it wants.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

_GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_VERSION = 0xFFFF  # llama.cpp writes 3; far above that, the bytes are not a version at all


class NotAModel(ValueError):
    """``path`` cannot be a model: the message is the one line that says why (path included)."""


def check_model_file(path: str) -> None:
    """Raise :class:`NotAModel` unless ``path`` is a readable file with a GGUF header (v2+).

    A start-up check (microseconds: it reads 8 bytes), so that a missing file, a directory, an
    unreadable file or a text file is one clear line before anything is spawned, not a child that
    dies at every restart. Whether llama.cpp can load the rest is for llama.cpp to say.
    """
    def bad(why: str) -> NotAModel:
        return NotAModel(f"cannot load the model {path}: {why}")

    if os.path.isdir(path):
        raise bad("it is a directory, not a GGUF file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise bad("no such file") from None
    except OSError as e:
        raise bad(f"cannot read it: {e.strerror or e}") from None
    if head[:4] != _GGUF_MAGIC:
        raise bad(f"it is not a GGUF file (it begins {head[:4]!r}, not {_GGUF_MAGIC!r})")
    if len(head) < 8:
        raise bad("it is not a GGUF file (the header is cut short)")
    version = struct.unpack("<I", head[4:])[0]
    if version & 0xFFFF == 0:  # written big-endian
        version = struct.unpack(">I", head[4:])[0]
    if not 2 <= version <= _GGUF_MAX_VERSION:
        raise bad(f"it is not a GGUF file this llama.cpp can read (header version {version})")


class _Reader:
    """GGUF's header encoding over an open file: the magic and version, then scalars, strings
    and arrays. Never reads, allocates or seeks past the file's end (a hostile length is a
    ValueError). ``arrays``: an array's value is its length, or its numbers when at most
    ``_SMALL_ARRAY``; without it, None (the array is read past)."""

    def __init__(self, f: BinaryIO, size: int, arrays: bool = False):
        self.f, self.size, self.arrays = f, size, arrays
        if self.take(4) != _GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        self.order = "<"
        version = struct.unpack("<I", self.take(4))[0]
        if version & 0xFFFF == 0:  # written big-endian
            self.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")

    def _room(self, n: int) -> None:
        if n > self.size - self.f.tell():  # a length no file this size can hold: never allocate it
            raise ValueError("the GGUF header is cut short or corrupt")

    def take(self, n: int) -> bytes:
        self._room(n)
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError("the GGUF header is cut short")
        return data

    def unpack(self, fmt: str):
        fmt = self.order + fmt
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY:
            item, n = self.unpack("I"), self.unpack("Q")
            if item in _GGUF_SCALARS:
                code = _GGUF_SCALARS[item]
                width = struct.calcsize(self.order + code)
                if self.arrays and n <= _SMALL_ARRAY:
                    return list(struct.unpack(f"{self.order}{n}{code}", self.take(n * width)))
                self._room(n * width)
                self.f.seek(n * width, os.SEEK_CUR)
            else:
                self._room(n)  # each item takes at least a byte
                for _ in range(n):
                    self.value(item)
            return n if self.arrays else None
        raise ValueError(f"unknown GGUF value type {kind}")


def gguf_block_count(path: str) -> int:
    """The model's repeating layers, ``<general.architecture>.block_count``, read from the GGUF
    header (what llama.cpp reads into n_layer). Reads only up to that key, which precedes the
    tokenizer's big arrays in files written by llama.cpp's converters, so it takes microseconds.
    Raises ValueError for a file that is not GGUF (v2 or later) or lacks the key.
    """
    with open(path, "rb") as f:
        r = _Reader(f, os.fstat(f.fileno()).st_size)
        r.unpack("Q")  # the tensor count, not needed here
        n_kv = r.unpack("Q")
        arch, counts = None, {}
        for _ in range(n_kv):
            key = r.string()
            val = r.value(r.unpack("I"))
            if key == "general.architecture":
                arch = val
            elif key.endswith(".block_count") and isinstance(val, int) and not isinstance(val, bool):
                counts[key] = val
            if arch is not None and f"{arch}.block_count" in counts:
                return counts[f"{arch}.block_count"]
    raise ValueError(f"no {arch or '<architecture>'}.block_count in the GGUF header")


@dataclass(frozen=True)
class Tensor:
    name: str
    offset: int  # from the start of the data section
    nbytes: int  # its bytes in the file (to the next tensor's offset: alignment padding included)


@dataclass(frozen=True)
class Header:
    """A GGUF file's metadata (scalars and strings; an array as its length, or its values when
    it holds at most ``_SMALL_ARRAY`` numbers) and its tensors, in file order."""

    keys: dict[str, Any]
    tensors: tuple[Tensor, ...]

    def arch_key(self, name: str, default: Any = None) -> Any:
        return self.keys.get(f"{self.keys.get('general.architecture', '')}.{name}", default)


_SMALL_ARRAY = 4096


def read_header(path: str) -> Header:
    """The whole header of ``path`` (milliseconds: the tokenizer's arrays are read past, not
    kept). Tensor sizes come from the offsets and the file's size, so no ggml type table is
    needed. Raises ValueError for a file that is not GGUF v2+ or whose header is cut short."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        r = _Reader(f, size, arrays=True)
        unpack, string, value = r.unpack, r.string, r.value
        n_tensors, n_kv = unpack("Q"), unpack("Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 16:
            raise ValueError(f"{n_tensors} tensors, {n_kv} keys: not a GGUF file this can read")
        keys: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            keys[key] = value(unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = unpack("I")
            if n_dims > 8:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            for _ in range(n_dims):
                unpack("Q")
            unpack("I")  # its ggml type
            infos.append((name, unpack("Q")))
        align = keys.get("general.alignment", 32)
        align = align if isinstance(align, int) and align > 0 else 32
        start = -(-f.tell() // align) * align
    offsets = [o for _, o in infos]
    if len(set(offsets)) != len(offsets) or any(o >= size - start for o in offsets):
        raise ValueError("the GGUF file's tensor offsets overlap or point past its end")
    ends = sorted(set(offsets) | {size - start})
    following = {o: ends[i + 1] for i, o in enumerate(ends[:-1])}
    tensors = tuple(Tensor(name, off, following.get(off, off) - off) for name, off in infos)
    return Header(keys, tensors)
