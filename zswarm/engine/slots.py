"""The slot threads: each serves waiting requests one at a time with its own model.

Owns :class:`Slot`, which takes a :class:`~.scheduler.Job`, streams the model's output as wire
Chunks and ends every job with exactly one Done or Fail, and how a GenRequest becomes
llama-cpp-python parameters. A slot never touches the socket (it hands replies to the IO thread
through ``reply``) and never loads a model; a failed request must never end the slot.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, Iterator

from .. import wire
from .loading import ContextTooLong, _Model, json_grammar
from .scheduler import Interrupted, Job, Scheduler

log = logging.getLogger("zswarm.engine")

SEED_MODULUS = 0xFFFFFFFF  # llama.cpp seeds are uint32 and 0xFFFFFFFF means "pick one at random"


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

    @property
    def evaluated(self) -> int:
        """Tokens this slot's model has evaluated (any thread; for the heartbeat)."""
        return self._llm.evaluated

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
        taken = first = time.monotonic()
        cache = self._llm.cache
        if req.seed is not None:
            # A reused prefix is evaluated in other batches than a fresh prompt, which moves the
            # logits by a rounding error: enough for sampling to pick another token. A seeded
            # request is evaluated from scratch, so its seed gives the same answer every time.
            self._llm.cache = None
            self._llm.reset()
        try:
            job.check()
            finish = "length"
            for text, reason in _pieces(req.kind, self._start(req)):
                if text:
                    if not job.started:  # the first chunk names this node: a stream's headers say who serves it
                        job.started, first = True, time.monotonic()
                        self._reply(job, wire.Chunk(req.id, text, node=self._node_id))
                    else:
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
        finally:
            self._llm.cache = cache
        end = time.monotonic()
        if not job.started:
            first = end
        self._reply(job, wire.Done(id=req.id, finish_reason=finish, prompt_tokens=job.prompt_tokens,
                                   completion_tokens=job.completion_tokens, node=self._node_id,
                                   cached_tokens=job.cached_tokens, prompt_s=round(first - taken, 6),
                                   gen_s=round(end - first, 6)))

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
            if req.json_output:
                params["grammar"] = json_grammar(req.json_schema)
            return self._llm.create_chat_completion(messages=messages, **params)
        return self._llm.create_completion(req.prompt, **params)
