"""A stand-in inference engine for benchmarks that measure routing alone (used by
routing_overhead.py and balancing_quality.py, through ``common.Nodes.start(stand_in=True)``).

The stand-in speaks the engine's side of the wire (zswarm/engine/proc.py): it binds the ROUTER at
``--endpoint``, writes ``READY <model>`` on stdout, and answers each GenRequest with one Chunk and
one Done. It serves ONE request at a time for ``--service-ms`` (default: the environment variable
ZSWARM_BENCH_SERVICE_MS, else 0: answer at once), queueing the rest in arrival order; a queue
longer than ``--max-queue`` is refused with Fail(overloaded), as the real engine does. Service is
planned on an ideal clock (a request starts when the previous one was due to end, not when the
loop next woke), so a node's capacity is exactly 1000 / service-ms requests per second.

How it gets into a real node without touching zswarm: a node is started as

    python benchmarks/fake_engine.py node ROLE [zswarm node flags...]

which runs ``zswarm ROLE ...`` in that process (zswarm.cli.main) after replacing
``zswarm.node.engine_argv`` with one that starts this file's ``engine`` mode instead of
``python -m zswarm.engine.proc``. Everything else (gateway, balancer, supervisor, gunicorn, the
READY handshake) is the real node. This is a test double, for benchmarks that measure routing only.

    python benchmarks/fake_engine.py engine --endpoint ipc:///tmp/e.sock [--service-ms 50]
"""

from __future__ import annotations

import collections
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAND_IN_MODEL = "stand-in"


# --- the stand-in engine (its own process) ---

def serve(endpoint: str, node_id: str, service_s: float, max_queue: int, model: str) -> int:
    import zmq

    from zswarm import wire

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else ""
    if path and os.path.exists(path):
        os.unlink(path)
    sock.bind(endpoint)
    print(f"READY {model}", flush=True)
    parent = os.getppid()
    queue: collections.deque[tuple[float, list[bytes], str]] = collections.deque()  # (due, route, id)
    last_due = 0.0
    served = 0
    # the node kills an engine that sends no heartbeat (ZSWARM_CHILD_HANG_S): beat as the real one does
    from zswarm.engine.child import start_beat

    start_beat(sys.stdout, lambda: f"{served} {len(queue)}")

    def send(route: list[bytes], body: Any) -> None:
        sock.send_multipart([*route, wire.encode_inference(node_id, body)])

    def finish(route: list[bytes], rid: str) -> None:
        send(route, wire.Chunk(rid, " ok"))
        send(route, wire.Done(id=rid, finish_reason="stop", prompt_tokens=1, completion_tokens=1, node=node_id))

    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, route, rid = queue.popleft()
            finish(route, rid)
            served += 1
        timeout_ms = 500 if not queue else max(0, math.ceil((queue[0][0] - now) * 1000))
        if not poller.poll(timeout_ms):
            if os.getppid() != parent:
                break
            continue
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            route, payload = frames[:-1], frames[-1]
            try:
                body = wire.decode_inference(payload).body
            except wire.BadFrame:
                continue
            if isinstance(body, wire.GenRequest):
                if body.model != model:
                    send(route, wire.Fail(id=body.id, code="model_not_found", message=f"this is {model!r}",
                                          node=node_id))
                elif service_s <= 0:
                    finish(route, body.id)
                    served += 1
                elif len(queue) > max_queue:  # one running plus max_queue waiting, as in the engine
                    send(route, wire.Fail(id=body.id, code="overloaded", message="queue full", node=node_id))
                else:
                    last_due = max(time.monotonic(), last_due) + service_s
                    queue.append((last_due, route, body.id))
            elif isinstance(body, wire.Cancel):
                for item in list(queue):
                    if item[2] == body.id:
                        queue.remove(item)
                        send(item[1], wire.Fail(id=body.id, code="cancelled", message="cancelled", node=node_id))
    sock.close(0)
    ctx.term()
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass
    print(f"stand-in served {served} requests", file=sys.stderr, flush=True)
    return 0


def _engine_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="fake_engine.py engine")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--node-id", default="")
    p.add_argument("--service-ms", type=float, default=float(os.environ.get("ZSWARM_BENCH_SERVICE_MS", "0") or 0))
    p.add_argument("--max-queue", type=int, default=128)
    p.add_argument("--name", default=STAND_IN_MODEL)
    args, _ = p.parse_known_args(argv)  # the real engine's other flags are accepted and ignored
    return serve(args.endpoint, args.node_id, args.service_ms / 1000, args.max_queue, args.name)


def _node_main(argv: list[str]) -> int:
    """``zswarm ROLE ...`` in this process, with the stand-in in place of the engine."""
    import zswarm.node
    from zswarm.cli import main

    def engine_argv(serve_settings: Any, endpoint: str, node_id: str, *_: Any, **__: Any) -> list[str]:
        # extra arguments (a sharding plan, say) concern the real engine only
        return [sys.executable, str(Path(__file__).resolve()), "engine", "--endpoint", endpoint,
                "--node-id", node_id, "--max-queue", str(serve_settings.max_queue)]

    zswarm.node.engine_argv = engine_argv
    return main(argv)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("engine", "node"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    mode, rest = sys.argv[1], sys.argv[2:]
    sys.exit(_engine_main(rest) if mode == "engine" else _node_main(rest))
