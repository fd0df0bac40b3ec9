"""Slow HTTP clients against zswarm's gunicorn: does ``/healthz`` keep answering?

Starts the HTTP app under gunicorn exactly as a node does (``-c python:zswarm.http.gunicorn_conf``,
one worker), opens N connections that each send a partial request line and then trickle one
header byte per ``--trickle`` seconds, and probes ``/healthz`` every 0.25 s on fresh connections
for ``--seconds``. Prints the probes' latency (median, p99, max), how many failed (no answer
within 5 s), and when the server dropped the slow connections.

``--worker-class gthread`` measures gunicorn's stock worker with the same settings otherwise
(``ZSWARM_HTTP_THREADS`` too), for the before/after figures in docs/RELIABILITY.md:

    python3 benchmarks/slow_clients.py --clients 40 --worker-class gthread --threads 16
    python3 benchmarks/slow_clients.py --clients 40

Only 127.0.0.1 is used; no node runs (``/healthz`` needs none).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster import free_port, wait_for  # noqa: E402
from slowclient import SlowHeaders  # noqa: E402


def start_gunicorn(port: int, worker_class: str | None, threads: int | None,
                   env_extra: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZSWARM_")}
    env.update(PYTHONPATH=str(ROOT), ZSWARM_ADDRESS=f"127.0.0.1:{port}", ZSWARM_HTTP_WORKERS="1",
               ZSWARM_NODE_ENDPOINT=f"ipc://{tempfile.gettempdir()}/zswarm-bench-none.sock", **env_extra)
    if threads:
        env["ZSWARM_HTTP_THREADS"] = str(threads)
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:zswarm.http.gunicorn_conf"]
    if worker_class:
        argv += ["--worker-class", worker_class]
    return subprocess.Popen([*argv, "zswarm.http.wsgi:app_factory()"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def healthz(port: int, timeout_s: float = 5.0) -> float | None:
    """Seconds one GET /healthz took on a new connection; None if it failed or timed out."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.settimeout(max(0.01, timeout_s - (time.monotonic() - t0)))
            s.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return time.monotonic() - t0 if data.startswith(b"HTTP/1.1 200") else None
    except OSError:
        return None


def measure(port: int, clients: int, seconds: float, trickle_s: float) -> dict:
    stop = threading.Event()
    slow = [SlowHeaders(port, stop, trickle_s) for _ in range(clients)]
    for c in slow:
        c.start()
    wait_for(lambda: all(c.connected for c in slow), 10, what="the slow clients to connect", retry=())
    t0 = time.monotonic()
    lat: list[float] = []
    failed = 0
    worst_at = 0.0
    while time.monotonic() - t0 < seconds:
        t = healthz(port)
        if t is None:
            failed += 1
        else:
            lat.append(t)
            worst_at = max(worst_at, t)
        time.sleep(0.25)
    stop.set()
    for c in slow:
        c.join(trickle_s + 6)
    drops = sorted(c.cut_after_s for c in slow
                   if c.cut_after_s is not None and c.connected + c.cut_after_s - t0 < seconds)
    lat.sort()
    return {"probes": len(lat) + failed, "failed": failed,
            "median_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
            "max_ms": round(1000 * lat[-1], 1) if lat else None,
            "dropped": len(drops), "dropped_after_s": (round(drops[0], 1), round(drops[-1], 1)) if drops else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--trickle", type=float, default=1.0, help="seconds between a slow client's bytes")
    ap.add_argument("--worker-class", default=None, help="e.g. gthread (default: zswarm's gunicorn_conf)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    port = free_port()
    proc = start_gunicorn(port, args.worker_class, args.threads, {})
    try:
        wait_for(lambda: healthz(port, 1.0) is not None, 20, 0.1, what="gunicorn to answer", retry=())
        result = measure(port, args.clients, args.seconds, args.trickle)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    print(f"worker={args.worker_class or 'zswarm default'} threads={args.threads or 'default'} "
          f"clients={args.clients} seconds={args.seconds}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
