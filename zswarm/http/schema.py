"""OpenAI's request bodies as msgspec Structs, their translation to a GenRequest, and the reply bodies.

Only what zswarm acts on is declared, and the options it does not serve yet (``tools``,
``logprobs``, ``echo``...), typed so that only "not asked for" passes: a client must not get a
200 that silently ignored them. msgspec skips every other field, because OpenAI clients send
many (``user``, ``frequency_penalty``...). A body that does not fit raises
:class:`~zswarm.http.errors.ApiError` (400) naming the offending field in ``param``.

The request Structs are also the request schemas of /openapi.json (openapi.py generates them
with ``msgspec.json.schema_components``): every rule a body must keep is written in the types
(``Meta`` bounds, ``Literal``), never only in code after decoding, so the document and the
decoder cannot disagree; docstrings and ``Meta`` descriptions are what clients read there.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal, Union

import msgspec

from .. import wire
from .errors import ApiError

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
# Ends each request's docstring: its description in /openapi.json.
_NOTE = """

Fields zswarm does not read (`user`, `frequency_penalty`...) are accepted and ignored;
options it does not serve yet (`tools`, `logprobs`, `echo`...) are a 400 naming the field. Types are strict, as in OpenAI's API: "5" is not a number, 1 is not a boolean, and
4.0 is not an integer (which JSON Schema would allow); each is a 400 naming the field in
`error.param`."""


class ContentPart(msgspec.Struct):
    """One part of a message's content; parts are joined with newlines, as vLLM does."""

    type: Annotated[Literal["text"], msgspec.Meta(description="only text parts are supported")]
    text: str = ""


class Message(msgspec.Struct):
    """One turn of the conversation, passed to the model's chat template."""

    role: Annotated[str, msgspec.Meta(description="system, user, assistant... as the chat template knows them",
                                      examples=["user"])]
    content: Annotated[Union[str, list[ContentPart], None],
                       msgspec.Meta(description="null: an assistant turn with tool calls only")] = None
    name: Union[str, None] = None


class StreamOptions(msgspec.Struct):
    include_usage: Annotated[Union[bool, None], msgspec.Meta(
        description="end the stream with one more chunk: no choices, the usage of the whole answer")] = False


class JsonSchemaSpec(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(max_length=64, description="the schema's name (OpenAI's rule: a-z, A-Z, 0-9, _ and -)")]
    schema: Annotated[Union[dict[str, Any], None], msgspec.Meta(
        description="a JSON Schema the answer must validate against; null: any JSON object")] = None
    description: Union[str, None] = None
    strict: Union[bool, None] = None


class ResponseText(msgspec.Struct, tag_field="type", tag="text"):
    """Free text (the default)."""


class ResponseJsonObject(msgspec.Struct, tag_field="type", tag="json_object"):
    """The answer is one JSON object (constrained by a llama.cpp grammar while it is generated)."""


class ResponseJsonSchema(msgspec.Struct, tag_field="type", tag="json_schema"):
    """The answer is JSON that validates against ``json_schema.schema`` (a grammar built from it)."""

    json_schema: JsonSchemaSpec


# Options agents send that zswarm does not serve yet: a 400 naming the field, never a 200 that
# silently did something else. Each type admits only what "not asked for" looks like.
_NOT_YET = "not supported by zswarm yet: only {} is accepted"
_Off = Annotated[Union[Literal[False], None], msgspec.Meta(description=_NOT_YET.format("false or null"))]
_NoneOnly = Annotated[None, msgspec.Meta(description=_NOT_YET.format("null"))]
_NoList = Annotated[Union[Annotated[list[Any], msgspec.Meta(max_length=0)], None],
                    msgspec.Meta(description=_NOT_YET.format("an empty list or null"))]


class _Common(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(description="a model some node of the cluster serves (GET /v1/models)")]
    max_tokens: Annotated[Union[PositiveInt, None], msgspec.Meta(
        description="most tokens to generate; null: until the model stops or the context is full")] = None
    temperature: Annotated[Union[Annotated[float, msgspec.Meta(ge=0, le=2)], None],
                           msgspec.Meta(description="sampling temperature; null: 1")] = None
    top_p: Annotated[Union[Annotated[float, msgspec.Meta(ge=0, le=1)], None],
                     msgspec.Meta(description="nucleus sampling; null: 1")] = None
    stop: Annotated[Union[str, list[str], None],
                    msgspec.Meta(description="strings that end the answer where the model writes one")] = None
    # int64, as OpenAI's API has it; without the bound a larger seed passes here and then fails
    # to encode on its way to the node (msgpack stops at 2**64 - 1)
    seed: Annotated[Union[Annotated[int, msgspec.Meta(ge=-(2 ** 63), le=2 ** 63 - 1)], None], msgspec.Meta(
        description="for repeatable sampling; null: a fresh random seed for each request")] = None
    stream: Annotated[Union[bool, None], msgspec.Meta(
        description="answer as server-sent events, a chunk at a time, then `data: [DONE]`")] = False
    stream_options: Union[StreamOptions, None] = None
    n: Annotated[Union[Literal[1], None], msgspec.Meta(description="choices per answer: only one")] = None
    echo: _Off = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Common, kw_only=True):
    __doc__ = "The body of POST /v1/chat/completions." + _NOTE

    messages: Annotated[list[Message], msgspec.Meta(
        min_length=1, description="the conversation so far", examples=[[{"role": "user", "content": "Hello!"}]])]
    max_completion_tokens: Annotated[Union[PositiveInt, None], msgspec.Meta(
        description="the newer name of max_tokens; wins when both are given")] = None
    response_format: Union[ResponseText, ResponseJsonObject, ResponseJsonSchema, None] = None
    logprobs: _Off = None
    top_logprobs: _NoneOnly = None
    tools: _NoList = None
    tool_choice: Annotated[Union[Literal["none"], None], msgspec.Meta(
        description=_NOT_YET.format('"none" or null'))] = None
    functions: _NoList = None
    function_call: Annotated[Union[Literal["none"], None], msgspec.Meta(
        description=_NOT_YET.format('"none" or null'))] = None


# the engine has nothing to continue from an empty prompt (it answered 400 "the prompt is
# empty"); saying so in the type makes it the decoder's 400 and the document's rule
_Prompt = Annotated[str, msgspec.Meta(min_length=1)]


class CompletionRequest(_Common, kw_only=True):
    __doc__ = "The body of POST /v1/completions." + _NOTE

    prompt: Annotated[Union[_Prompt, Annotated[list[_Prompt], msgspec.Meta(min_length=1, max_length=1)]],
                      msgspec.Meta(description="the text to continue: a string, or a list of exactly one "
                                   "string; not empty", examples=["Once upon a time"])]
    logprobs: _NoneOnly = None
    suffix: _NoneOnly = None


# What each kind of completion decodes its body as; /openapi.json documents these same types.
REQUESTS = {"chat": ChatRequest, "completion": CompletionRequest}
# strict (see _NOTE): msgspec's default, kept because OpenAI's API is strict too
_decoders = {kind: msgspec.json.Decoder(t) for kind, t in REQUESTS.items()}
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
    """Decode one request body; ``kind`` is "chat" or "completion". Every check is in the types."""
    try:
        return _decoders[kind].decode(body)
    except msgspec.ValidationError as e:
        raise ApiError(400, f"Invalid request: {e}", param=_param(str(e))) from None
    except msgspec.DecodeError:
        raise ApiError(400, "We could not parse the JSON body of your request.") from None
    except UnicodeDecodeError:  # msgspec raises it, not DecodeError, for bad UTF-8 inside a string
        raise ApiError(400, "The JSON body of your request is not valid UTF-8.") from None
    except RecursionError:  # msgspec counts nesting against Python's recursion limit
        raise ApiError(400, "The JSON body of your request is nested too deeply.") from None


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
        fmt = req.response_format
        if isinstance(fmt, (ResponseJsonObject, ResponseJsonSchema)):
            common["json_output"] = True
            if isinstance(fmt, ResponseJsonSchema) and fmt.json_schema.schema is not None:
                common["json_schema"] = msgspec.json.encode(fmt.json_schema.schema).decode()
        return wire.GenRequest(kind="chat", messages=messages, **common)
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    return wire.GenRequest(kind="completion", prompt=prompt, **common)


# --- reply bodies ---

def usage(done: wire.Done) -> dict[str, Any]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            # as OpenAI reports them: prompt tokens the serving engine had cached (its prefix cache)
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


class Replies:
    """Builds the bodies of one answer, chat or completion, whole or as stream chunks."""

    def __init__(self, kind: str, request_id: str, model: str):
        self.chat = kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.node = ""  # the serving node's id, once its first chunk (or Done) named it

    def _head(self, obj: str) -> dict[str, Any]:
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        if self.node:  # the node whose engine answers (OpenAI's field for "which backend")
            head["system_fingerprint"] = f"zswarm-{self.node}"
        return head

    def whole(self, text: str, done: wire.Done) -> dict[str, Any]:
        self.node = done.node or self.node
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
