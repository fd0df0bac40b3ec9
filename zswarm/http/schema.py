"""OpenAI's request bodies as msgspec Structs, their translation to a GenRequest, and the reply bodies.

Only what zswarm acts on is declared; msgspec skips every other field, because OpenAI clients
send many (``user``, ``logprobs``, ``frequency_penalty``...). A body that does not fit raises
:class:`~zswarm.http.errors.ApiError` (400) naming the offending field in ``param``.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Union

import msgspec

from .. import wire
from .errors import ApiError

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class ContentPart(msgspec.Struct):
    type: str
    text: str = ""


class Message(msgspec.Struct):
    role: str
    content: Union[str, list[ContentPart], None] = None  # None: an assistant turn with tool calls only
    name: Union[str, None] = None


class StreamOptions(msgspec.Struct):
    include_usage: Union[bool, None] = False


class _Common(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: Union[PositiveInt, None] = None
    temperature: Union[Annotated[float, msgspec.Meta(ge=0, le=2)], None] = None
    top_p: Union[Annotated[float, msgspec.Meta(ge=0, le=1)], None] = None
    stop: Union[str, list[str], None] = None
    seed: Union[int, None] = None
    stream: Union[bool, None] = False
    stream_options: Union[StreamOptions, None] = None
    n: Union[int, None] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Common, kw_only=True):
    messages: list[Message]
    max_completion_tokens: Union[PositiveInt, None] = None  # the newer name of max_tokens


class CompletionRequest(_Common, kw_only=True):
    prompt: Union[str, list[str]]


# strict: "5" is not a number and 1 is not a boolean (as OpenAI's API has it); the price is that
# 4.0 is not an integer either, which JSON Schema would allow (a documented 400)
_decoders = {"chat": msgspec.json.Decoder(ChatRequest), "completion": msgspec.json.Decoder(CompletionRequest)}
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")


def _param(message: str) -> str | None:
    """``messages[0].role`` from msgspec's "Object missing required field `role` - at `$.messages[0]`"."""
    at = _AT.search(message)
    path = at.group("path") if at else ""
    missing = _MISSING.search(message)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return path or None


def parse(kind: str, body: bytes) -> Union[ChatRequest, CompletionRequest]:
    """Decode and check one request body; ``kind`` is "chat" or "completion"."""
    try:
        req = _decoders[kind].decode(body)
    except msgspec.ValidationError as e:
        raise ApiError(400, f"Invalid request: {e}", param=_param(str(e))) from None
    except msgspec.DecodeError:
        raise ApiError(400, "We could not parse the JSON body of your request.") from None
    except UnicodeDecodeError:  # msgspec raises it, not DecodeError, for bad UTF-8 inside a string
        raise ApiError(400, "The JSON body of your request is not valid UTF-8.") from None
    except RecursionError:  # msgspec counts nesting against Python's recursion limit
        raise ApiError(400, "The JSON body of your request is nested too deeply.") from None
    if req.n not in (None, 1):
        raise ApiError(400, "Only n=1 is supported.", param="n")
    if isinstance(req, ChatRequest):
        if not req.messages:
            raise ApiError(400, "messages must not be empty.", param="messages")
        for i, m in enumerate(req.messages):
            for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
                if part.type != "text":
                    raise ApiError(400, f"Content parts of type {part.type!r} are not supported; only 'text'.",
                                   param=f"messages[{i}].content[{j}].type")
    elif isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise ApiError(400, "prompt must be a string or a list of exactly one string.", param="prompt")
    return req


def _text(content: Union[str, list[ContentPart], None]) -> str:
    if isinstance(content, list):
        return "\n".join(p.text for p in content)  # as vLLM does: parts are separate paragraphs
    return content or ""


def to_gen_request(req: Union[ChatRequest, CompletionRequest], request_id: str,
                   timeout_s: float = 0.0) -> wire.GenRequest:
    """``timeout_s``: seconds the cluster may take to answer (0: no limit)."""
    common: dict[str, Any] = dict(
        id=request_id,
        timeout_s=timeout_s,
        whole=not req.stream,  # the client sees nothing before Done: retryable until then
        model=req.model,
        max_tokens=req.max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or ()),
        seed=req.seed,
    )
    if isinstance(req, ChatRequest):
        if req.max_completion_tokens is not None:
            common["max_tokens"] = req.max_completion_tokens
        messages = [wire.ChatMessage(role=m.role, content=_text(m.content), name=m.name) for m in req.messages]
        return wire.GenRequest(kind="chat", messages=messages, **common)
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    return wire.GenRequest(kind="completion", prompt=prompt, **common)


# --- reply bodies ---

def usage(done: wire.Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


class Replies:
    """Builds the bodies of one answer, chat or completion, whole or as stream chunks."""

    def __init__(self, kind: str, request_id: str, model: str):
        self.chat = kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, done: wire.Done) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": done.finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
            body = self._head("text_completion")
        body.update(choices=[choice], usage=usage(done))
        return body

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion")
        body["choices"] = [choice]
        return body

    def usage_chunk(self, done: wire.Done) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body.update(choices=[], usage=usage(done))
        return body
