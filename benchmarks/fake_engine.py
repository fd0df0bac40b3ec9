"""A stand-in inference engine for benchmarks that measure routing alone, and the helpers that run
zswarm nodes around it (used by routing_overhead.py, balancing_quality.py and model_throughput.py).

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
import datetime
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAND_IN_MODEL = "stand-in"
DOC = ROOT / "docs" / "BENCHMARKS.md"
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long (a node gives gunicorn 5 s itself)


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


# --- running nodes (the benchmark's process) ---

def free_port(span: int = 2, host: str = "127.0.0.1") -> int:
    """A port P with P..P+span-1 free now (a node binds P and P+1): above the kernel's ephemeral
    range (32768-60999), so never one it hands to an outgoing connection, and away from the
    20000-32000 the test suite uses."""
    for _ in range(2000):
        base = 61000 + int.from_bytes(os.urandom(2), "big") % 4000
        socks = []
        try:
            for p in range(base, base + span):
                s = socket.socket()
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port")


class NodeDied(RuntimeError):
    pass


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except NodeDied:
            raise
        except Exception as e:  # admin socket not there yet, connection refused...
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}" + (f" ({last})" if last else ""))
        time.sleep(interval_s)


@dataclass
class Node:
    name: str
    role: str
    state_dir: Path
    p2p: str
    http: str  # host:port of its OpenAI API
    proc: subprocess.Popen
    log: Path

    def admin(self, command: str, **args: Any) -> Any:
        from zswarm.admin_client import call

        return call(str(self.state_dir), command, args, timeout_s=3.0)

    def routes(self, model: str) -> list[dict]:
        return [r for r in self.admin("status")["gateway"]["routes"] if model in r["models"]]

    def pids(self) -> list[int]:
        """The node and every process below it (gunicorn master and workers, engine)."""
        return [self.proc.pid, *descendants(self.proc.pid)]


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a live process has used; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def comm(pid: int) -> str:
    try:
        return " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")).strip()
    except OSError:
        return "?"


class Nodes:
    """Every node this benchmark starts; :meth:`close` stops them all (SIGTERM, then SIGKILL)."""

    def __init__(self, token: str | None = None, keep: bool = False):
        from zswarm.token import Token

        self.token = token or Token.generate().encode()
        self.tmp = Path(tempfile.mkdtemp(prefix="zswarm-bench-"))
        self.keep = keep
        self.nodes: list[Node] = []

    def start(self, role: str, name: str, extra: list[str] = (), bootstrap: Node | None = None,
              stand_in: bool = True, env: dict[str, str] | None = None) -> Node:
        port = free_port(2)
        http = f"127.0.0.1:{free_port(1)}"
        state = self.tmp / name
        args = [role, "--token", self.token, "--no-mdns", "--p2p-listen", f"127.0.0.1:{port}",
                "--address", http, "--state-dir", str(state), "--name", name, "--log-level", "WARNING",
                *(["--bootstrap", bootstrap.p2p] if bootstrap else []), *extra]
        cmd = ([sys.executable, str(Path(__file__).resolve()), "node", *args] if stand_in
               else [sys.executable, "-m", "zswarm", *args])
        log = self.tmp / f"{name}.log"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=full_env, cwd=ROOT, preexec_fn=_die_with_parent)
        node = Node(name, role, state, f"127.0.0.1:{port}", http, proc, log)
        self.nodes.append(node)
        return node

    def check(self, node: Node) -> None:
        if node.proc.poll() is not None:
            tail = node.log.read_text(errors="replace").splitlines()[-15:] if node.log.exists() else []
            raise NodeDied(f"{node.name} exited with status {node.proc.returncode}; the end of its log:\n"
                           + "\n".join(tail))

    def wait_routes(self, node: Node, model: str, n: int, timeout_s: float) -> None:
        def ready() -> bool:
            self.check(node)
            return len(node.routes(model)) >= n
        wait_for(ready, timeout_s, f"{node.name} to route {model} to {n} node(s)")

    def wait_http(self, node: Node, model: str, timeout_s: float) -> None:
        """Until ``GET /v1/models`` on the node's API lists ``model`` (gunicorn is up)."""
        import http.client

        def listed() -> bool:
            self.check(node)
            host, port = node.http.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
            try:
                conn.request("GET", "/v1/models")
                resp = conn.getresponse()
                return resp.status == 200 and model.encode() in resp.read()
            finally:
                conn.close()
        wait_for(listed, timeout_s, f"{node.name}'s API to list {model}")

    def stop(self, node: Node) -> None:
        stop_procs([node])
        self.nodes.remove(node)

    def close(self) -> None:
        stop_procs(self.nodes)
        self.nodes.clear()
        if not self.keep:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when this benchmark dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def exit_on_sigterm() -> None:
    """SIGTERM ends the benchmark through its ``finally`` blocks, so its nodes are stopped too."""
    def _raise(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _raise)


def stop_procs(nodes: list[Node]) -> None:
    """SIGTERM every node, wait up to STOP_GRACE_S, SIGKILL what is left, children included."""
    below = {n.name: descendants(n.proc.pid) for n in nodes}
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for n in nodes:
        try:
            n.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{n.name} did not stop on SIGTERM within {STOP_GRACE_S} s; killing it", file=sys.stderr)
            n.proc.kill()
            n.proc.wait(5)
    # the node stops its children itself; anything it left behind (started by us, through it) goes now
    for pids in below.values():
        for pid in pids:
            try:
                os.kill(pid, 0)
            except OSError:
                continue
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
            try:
                os.kill(pid, signal.SIGKILL)
                print(f"killed leftover process {pid}", file=sys.stderr)
            except OSError:
                pass


# --- reporting ---

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"nproc {os.cpu_count()}, {cpu}, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    return shlex.join([".venv/bin/python", script_text, *sys.argv[1:]])


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_section(key: str, text: str) -> None:
    """Replace this benchmark's section of docs/BENCHMARKS.md (between its markers), leaving the
    rest of the file as it is at this moment (other scripts write their own sections)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    body = f"{start}\n{text.strip()}\n{end}"
    doc = DOC.read_text() if DOC.exists() else (
        "# zswarm benchmarks\n\nEach section is written by one script in `benchmarks/` between its own "
        "markers; rerun the command it shows to refresh it.\n")
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        doc = head + body + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + body + "\n"
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(doc)
    os.replace(tmp, DOC)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("engine", "node"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    mode, rest = sys.argv[1], sys.argv[2:]
    sys.exit(_engine_main(rest) if mode == "engine" else _node_main(rest))
