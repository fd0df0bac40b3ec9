"""Chaos: a worker SIGSTOPped mid-generation, then SIGCONTed (real worker, server and model).

A server splits the model over two workers. A streamed answer is being generated when one
worker's whole process group (node and RPC server) is stopped. What must hold:

- the stream ends with a clear error, not a hang (llama.cpp has no RPC timeouts: the server
  notices the worker through the ledger and restarts its engine without it);
- the next request is answered, by the re-sharded engine;
- after SIGCONT the worker is believed again at once and the model is split over both again.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import pytest

from cluster import Cluster, descendants, wait_for
from test_worker_mode import MODEL, SERVER, ask, client, split_is
from zswarm.token import Token

pytestmark = pytest.mark.slow


def test_worker_sigstopped_mid_generation(tmp_path):
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        w1 = c.node("w1", "worker", extra=["--mem", "2GiB", "--threads", "1"])
        w2 = c.node("w2", "worker", bootstrap=[w1], extra=["--mem", "2GiB", "--threads", "1"])
        s = c.node("s", "server", bootstrap=[w1], extra=SERVER + ["--no-local-layers"])
        wait_for(lambda: split_is(s, ["w1", "w2"]), 120, 0.2, what="the model split over w1 and w2")
        ask(s)
        result: dict = {}
        first_chunk = threading.Event()

        def stream() -> None:
            text = ""
            try:
                for ch in client(s).chat.completions.create(
                        model=MODEL, stream=True, max_tokens=400,
                        messages=[{"role": "user", "content": "Write a long story about a lighthouse."}]):
                    if ch.choices and ch.choices[0].delta.content:
                        text += ch.choices[0].delta.content
                        first_chunk.set()
                result["outcome"] = "completed"
            except openai.APIError as e:
                result["outcome"] = f"error: {e}"
            result["text"] = text
            result["t"] = time.monotonic()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert first_chunk.wait(60), "the stream never started"
        t_stop = time.monotonic()
        w2.signal(signal.SIGSTOP)
        for child in descendants(w2.proc.pid):  # its RPC server too: the whole machine "freezes"
            os.kill(child, signal.SIGSTOP)
        t.join(120)
        assert not t.is_alive(), "the stream hung"
        assert result["outcome"] != "completed" or len(result["text"]) > 0
        ended_after = result["t"] - t_stop
        wait_for(lambda: split_is(s, ["w1"]), 90, 0.2, what="the engine re-sharded onto w1")
        t_resharded = time.monotonic()
        assert ask(s)  # served by the re-sharded engine
        for child in descendants(w2.proc.pid):
            os.kill(child, signal.SIGCONT)
        w2.signal(signal.SIGCONT)
        t_cont = time.monotonic()
        wait_for(lambda: split_is(s, ["w1", "w2"]), 90, 0.2, what="w2 back in the split")
        t_back = time.monotonic()
        assert ask(s)
        print(f"\nchaos worker SIGSTOP: stream ended ({result['outcome'][:60]}) {ended_after:.1f} s after the stop; "
              f"re-sharded onto w1 {t_resharded - t_stop:.1f} s after; back on both "
              f"{t_back - t_cont:.1f} s after SIGCONT")
    finally:
        for n in c.nodes:
            if n.running():
                for child in descendants(n.proc.pid):
                    try:
                        os.kill(child, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                n.signal(signal.SIGCONT)
        c.close()


