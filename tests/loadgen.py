"""Steady load for chaos tests: a few clients in a loop, each sending one request at a time.

``python loadgen.py URL MODEL OUT --plain N --stream M`` runs N clients of whole (non-streamed)
and M of streamed chat completions against URL until SIGTERM, then lets the requests in flight
end (each has a 120 s timeout) and exits. Each request ends as one JSON line in OUT:

``{"kind": "plain"|"stream", "t0", "t1", "status", "code", "message", "node", "chunks", "done"}``

``t0``/``t1`` are ``time.monotonic()`` (CLOCK_MONOTONIC: the same clock in every process of the
machine, whatever its namespace); ``status`` is None when no HTTP answer came (``message`` says
why); ``code`` is the OpenAI error's code, also for an error inside a stream; ``node`` is the
``X-Zswarm-Node`` header; ``done`` is True when a stream reached ``[DONE]`` without an error.
It runs inside the test's own network namespace, so it talks to the lab's entry point only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import threading
import time
from urllib.parse import urlsplit

TIMEOUT_S = 120.0


def one(url: str, model: str, stream: bool, n: int, max_tokens: int) -> dict:
    parts = urlsplit(url)
    body = json.dumps({"model": model, "stream": stream, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": f"Say one thing about the number {n}."}]})
    rec = {"kind": "stream" if stream else "plain", "t0": time.monotonic(), "status": None, "code": None,
           "message": "", "node": "", "chunks": 0, "done": False}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT_S)
    try:
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json", "Connection": "close"})
        resp = conn.getresponse()
        rec["status"] = resp.status
        rec["node"] = resp.getheader("X-Zswarm-Node", "")
        if not stream or resp.status != 200:
            data = resp.read()
            try:
                err = json.loads(data).get("error")
            except ValueError:
                err = {"message": data[:200].decode(errors="replace")}
            if err:
                rec["code"], rec["message"] = err.get("code"), err.get("message", "")
            return rec
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                rec["done"] = rec["code"] is None
                break
            obj = json.loads(data)
            if "error" in obj:
                rec["code"], rec["message"] = obj["error"].get("code"), obj["error"].get("message", "")
            elif any(c.get("delta", {}).get("content") for c in obj.get("choices", [])):
                rec["chunks"] += 1
    except (OSError, http.client.HTTPException, ValueError) as e:
        rec["message"] = repr(e)
    finally:
        conn.close()
        rec["t1"] = time.monotonic()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--plain", type=int, default=1)
    ap.add_argument("--stream", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=8)
    a = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lock = threading.Lock()
    counter = iter(range(1 << 30))
    out = open(a.out, "a", buffering=1)

    def client(stream: bool) -> None:
        while not stop.is_set():
            rec = one(a.url, a.model, stream, next(counter), a.max_tokens)
            with lock:
                out.write(json.dumps(rec) + "\n")
            if rec["status"] != 200 or not (rec["done"] or not stream):
                stop.wait(0.1)  # failing fast (no route, entry point down): do not spin

    threads = [threading.Thread(target=client, args=(False,)) for _ in range(a.plain)]
    threads += [threading.Thread(target=client, args=(True,)) for _ in range(a.stream)]
    for t in threads:
        t.start()
    print("started", flush=True)
    while not stop.wait(0.2):
        pass
    for t in threads:
        t.join()
    out.close()


if __name__ == "__main__":
    main()
