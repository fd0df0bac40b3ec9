"""A request's prompt as a chain of block hashes: what prefix-affinity routing compares. Pure.

A chat request's messages (role, name, content) or a completion's prompt are laid end to end as
one text, cut in blocks of ``BLOCK_CHARS`` characters; block k's hash covers block k and every
block before it, so two prompts share their first k hashes exactly when they share their first
k blocks of text. A conversation's next turn resends the earlier messages and adds to them, so
its chain starts with the previous turn's; an agent's fixed system prompt gives every request
the same first blocks. Only whole blocks count (a short prompt has an empty chain: nothing worth
routing for), and at most ``MAX_BLOCKS`` (the hashes travel in node records).

The text is the request's, not the engine's tokens: the entry point that routes has no tokenizer.
A prompt sharing k blocks with what a node's engine has cached shares, through the chat template,
about as many tokens of its KV cache.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from . import wire

BLOCK_CHARS = 256  # about 60 tokens of English
MAX_BLOCKS = 32  # 8192 characters: past that, a longer shared prefix changes no choice
_SEP_FIELD, _SEP_MESSAGE = "\x1f", "\x1e"


def text_of(req: wire.GenRequest) -> str:
    if req.kind == "chat":
        return "".join(f"{m.role}{_SEP_FIELD}{m.name or ''}{_SEP_FIELD}{m.content}{_SEP_MESSAGE}" for m in req.messages)
    return req.prompt


def chain(text: str, block: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS) -> tuple[int, ...]:
    """The chained 63-bit hashes of ``text``'s whole blocks (63 bits: a msgpack int, signed or not)."""
    out: list[int] = []
    h = b""
    for i in range(0, min(len(text) // block, max_blocks)):
        h = hashlib.blake2b(h + text[i * block:(i + 1) * block].encode("utf-8", "surrogatepass"),
                            digest_size=8).digest()
        out.append(int.from_bytes(h, "big") >> 1)
    return tuple(out)


def request_chain(req: wire.GenRequest) -> tuple[int, ...]:
    return chain(text_of(req))


def shared(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading blocks ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def best_shared(a: Sequence[int], chains: Sequence[Sequence[int]]) -> int:
    return max((shared(a, c) for c in chains), default=0)
