"""Worker mode: tokens/s and model load time, one node vs. llama.cpp RPC vs. zswarm's CURVE tunnels.

One run on this machine (everything on 127.0.0.1, mDNS off), the embedded SmolLM2-135M-Instruct:

- **(a) single node**: an engine child (``python -m zswarm.engine.proc``) with the whole model on
  its own CPU.
- **(b) direct RPC**: two ``python -m zswarm.engine.rpc_server`` processes, and an engine child
  whose ``--rpc-servers`` point straight at them (plain llama.cpp RPC over loopback TCP), split
  1:1, ``--no-local-layers``.
- **(c) zswarm tunnels**: two real ``zswarm worker --token T`` nodes (each a llama.cpp RPC server
  child on 127.0.0.1, reachable only through its CURVE tunnel exit on p2p port + 1); this
  process opens one :class:`zswarm.tunnel.TunnelEntry` to each exit (a ZAP handler in the same
  ZeroMQ context, as a server node does) and hands the entries' local ports to an engine child,
  split 1:1, ``--no-local-layers``: the same engine as (b), so (c)/(b) is what the tunnel costs.

Engine level (a, b, c): load time is from spawning the engine child to its READY line (Python
start, llama.cpp load, weights pushed to the RPC servers); ``--load-reps`` loads per variant,
taking turns. Then, with all three engines loaded, ``--reps`` greedy completions each (``--tokens``
new tokens, temperature 0, the count prompt never stops early), sent over a DEALER with
zswarm.wire messages, order rotated every repetition so drifting load hits all alike; one
untimed warm-up each. tokens/s = completion tokens / request time (send to Done); decode tokens/s
leaves out the time to the first token. Medians.

Node level (unless ``--no-servers``, before the engine level, on the same RPC servers and
workers): a static ``zswarm server --rpc-servers R1,R2 --no-local-layers`` over (b)'s RPC
servers, and a real ``zswarm server --p2p --no-local-layers --reshard-settle 1`` that finds the
two workers through the ledger and opens its own tunnels. Load time: from the server's
``re-sharding`` log line to ``engine: ready`` (the first split of the p2p server, then
``--load-reps`` re-shards asked through the admin socket on each server, taking turns; each
such time includes stopping the old engine); tokens/s: streamed ``POST /v1/completions``.

Diagnosis: this process's tunnel entries count, per stream, the DATA messages each way and the
*turns* (a reply arriving after a request went out: a round trip llama.cpp waited for), so the
report gives RPC round trips per generated token, and the cost per round trip that the (c) - (b)
gap implies, next to a 64-byte echo round trip through a TunnelEntry/TunnelExit pair measured in
this process at the same time.

Every process is stopped at the end (SIGTERM, then SIGKILL of its process group), whatever
happens; every wait has a deadline.

Run from the repository root:
    .venv/bin/python benchmarks/worker_mode.py [--tokens 128] [--reps 5] [--load-reps 3] [--write]
``--write`` replaces this benchmark's section of docs/BENCHMARKS.md (between its markers).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, WaitTimeout, add_run_options, free_port, measure_and_publish, now_utc  # noqa: E402
from common import stream_completion, wait_for  # noqa: E402
from common import command_line, load_values as loadavg, machine as common_machine  # noqa: E402
from zswarm import wire  # noqa: E402
from zswarm.admin_client import call  # noqa: E402
from zswarm.token import Token  # noqa: E402
from zswarm.transport import Stats, ZapHandler  # noqa: E402
from zswarm.tunnel import DATA, TunnelEntry, TunnelExit  # noqa: E402

KEY = "worker-mode"
PY = sys.executable
COUNT_PROMPT = "1, 2, 3, 4, 5, 6,"  # greedy decoding keeps counting: never stops by itself
STOP_S = 20.0  # SIGTERM grace per process
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

CHILDREN: list["Child"] = []  # every process this run started, for the final cleanup


# --- small helpers ---

def machine() -> str:
    from importlib.metadata import version
    return common_machine(f"llama-cpp-python {version('llama_cpp_python')}", f"libzmq {zmq.zmq_version()}")


class Child:
    """A process of this run, in its own process group; stdout piped (handshakes) or logged."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, pipe_stdout: bool):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if pipe_stdout else self._log,
                                     stderr=self._log if pipe_stdout else subprocess.STDOUT,
                                     start_new_session=True)
        CHILDREN.append(self)
        self._buf = b""

    def log(self) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log tail:\n{self.log()[-3000:]}")

    def read_until(self, prefix: str, timeout_s: float) -> tuple[list[str], float]:
        """stdout lines up to the first starting with ``prefix``; and when that line arrived."""
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while True:
            idx, lines = 0, []
            while (nl := self._buf.find(b"\n", idx)) >= 0:
                line = self._buf[idx:nl].decode(errors="replace")
                lines.append(line)
                idx = nl + 1
                if line.startswith(prefix):
                    self._buf = self._buf[idx:]
                    return lines, time.perf_counter()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {prefix} within {timeout_s} s; log tail:\n{self.log()[-3000:]}")
            if select.select([fd], [], [], min(left, 1.0))[0]:
                data = os.read(fd, 65536)
                if not data:
                    raise RuntimeError(f"{self.name} exited ({self.proc.wait(5)}) before {prefix}; "
                                       f"log tail:\n{self.log()[-3000:]}")
                self._buf += data

    def stop(self, timeout_s: float = STOP_S) -> None:
        """SIGTERM, then SIGKILL of the whole process group; always bounded."""
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    print(f"warning: {self.name} ignored SIGTERM for {timeout_s} s; killing it", file=sys.stderr)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: whatever it left behind
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                print(f"warning: {self.name} (pid {self.proc.pid}) still running after SIGKILL", file=sys.stderr)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._log.close()
            if self in CHILDREN:
                CHILDREN.remove(self)


def stop_all() -> None:
    for c in reversed(list(CHILDREN)):
        try:
            c.stop()
        except Exception as e:  # keep stopping the others
            print(f"warning: stopping {c.name}: {e}", file=sys.stderr)


# --- the pieces ---

def rpc_server(name: str, tmp: Path) -> tuple[Child, str]:
    c = Child(name, [PY, "-m", "zswarm.engine.rpc_server", "--port", "0", "--threads", "1"], tmp, True)
    lines, _ = c.read_until("READY", 30)
    return c, lines[-1].split()[1]


def worker(name: str, tmp: Path, token: str, bootstrap: int | None) -> tuple[Child, int, str]:
    port = free_port(3)
    argv = [PY, "-m", "zswarm", "worker", "--token", token, "--no-mdns", "--p2p-listen", f"127.0.0.1:{port}",
            "--state-dir", str(tmp / name), "--name", name, "--mem", "2GiB", "--threads", "1"]
    if bootstrap:
        argv += ["--bootstrap", f"127.0.0.1:{bootstrap}"]
    c = Child(name, argv, tmp, False)
    st = wait_for(lambda: (lambda s: s if s["children"]["rpc"]["state"] == "ready" else None)(
        call(str(tmp / name), "status", timeout_s=3)), 60, what=f"{name}'s RPC server", check=c.check)
    tunnel = st["rpc"]["tunnel"]
    assert tunnel == f"tcp://127.0.0.1:{port + 1}", tunnel  # the exit binds p2p port + 1
    return c, port, tunnel


class CountingEntry(TunnelEntry):
    """A TunnelEntry that counts, per stream, DATA messages each way and turns (a reply after a request)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.msgs_out = self.msgs_in = self.bytes_out = self.bytes_in = self.turns = 0
        self._last: dict[bytes, str] = {}

    def counters(self) -> dict[str, int]:
        return {"msgs_out": self.msgs_out, "msgs_in": self.msgs_in, "bytes_out": self.bytes_out,
                "bytes_in": self.bytes_in, "turns": self.turns}

    def _send(self, s, kind, payload=b""):
        ok = super()._send(s, kind, payload)
        if ok and s is not None and kind == DATA:
            self.msgs_out += 1
            self.bytes_out += len(payload)
            self._last[s.sid] = "out"
        return ok

    def _on_stream_frame(self, s, kind, payload):
        if kind == DATA:
            self.msgs_in += 1
            self.bytes_in += len(payload)
            if self._last.get(s.sid) == "out":
                self.turns += 1
            self._last[s.sid] = "in"
        super()._on_stream_frame(s, kind, payload)


def diff(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


class Engine:
    """One engine child and a DEALER to it."""

    def __init__(self, variant: str, extra: list[str], tmp: Path, ctx: zmq.Context, ctx_size: int):
        self.variant = variant
        sock_path = tmp / f"e-{variant}-{uuid.uuid4().hex[:6]}.sock"
        self.endpoint = f"ipc://{sock_path}"
        argv = [PY, "-m", "zswarm.engine.proc", "--endpoint", self.endpoint, "--ctx-size", str(ctx_size),
                "--threads", "1", "--parallel", "1", "--node-id", "bench", *extra]
        self.child = Child(f"engine-{variant}", argv, tmp, True)
        self.sock = None
        try:
            lines, t_ready = self.child.read_until("READY", 180)
        except BaseException:
            self.close()
            raise
        self.load_s = t_ready - self.child.t0
        self.model = lines[-1].split(" ", 1)[1].strip()
        self.layers = json.loads(lines[0][len("LAYERS "):]) if lines[0].startswith("LAYERS ") else {"local": "all"}
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(self.endpoint)

    def generate(self, prompt: str, tokens: int, timeout_s: float) -> dict:
        rid = uuid.uuid4().hex
        t0 = time.perf_counter()
        self.sock.send(wire.encode_inference("bench", wire.GenRequest(
            id=rid, kind="completion", model=self.model, prompt=prompt, temperature=0.0, top_p=1.0,
            max_tokens=tokens, seed=1)))
        deadline = time.monotonic() + timeout_s
        first, text = None, []
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise TimeoutError(f"engine {self.variant}: no answer within {timeout_s} s")
            body = wire.decode_inference(self.sock.recv()).body
            if getattr(body, "id", None) != rid:
                continue
            if isinstance(body, wire.Chunk):
                if first is None:
                    first = time.perf_counter()
                text.append(body.text)
            elif isinstance(body, wire.Done):
                end = time.perf_counter()
                return {"seconds": end - t0, "ttft": (first or end) - t0, "tokens": body.completion_tokens,
                        "text": "".join(text), "finish": body.finish_reason}
            elif isinstance(body, wire.Fail):
                raise RuntimeError(f"engine {self.variant}: {body.code}: {body.message}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.child.stop()


# --- node level: the real servers ---

LOG_TS = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ "
RESHARD_RE = re.compile(LOG_TS + r"zswarm\.actors\.sharder: re-sharding \((.*?)\)")
STARTED_RE = re.compile(LOG_TS + r"zswarm\.actors\.supervisor: engine: started")
READY_RE = re.compile(LOG_TS + r"zswarm\.actors\.supervisor: engine: ready")


def _ts(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def log_events(text: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        for kind, rx in (("reshard", RESHARD_RE), ("started", STARTED_RE), ("ready", READY_RE)):
            m = rx.match(line)
            if m:
                out.append((kind, _ts(m.group(1))))
    return out


def load_from_log(text: str, after_reshards: int) -> dict | None:
    """For the (after_reshards+1)-th re-sharding line (or the first engine start if the node never
    re-shards before it, as a static server): re-shard -> started -> ready, seconds."""
    ev = log_events(text)
    n = -1
    for i, (kind, t) in enumerate(ev):
        if kind == "reshard":
            n += 1
            if n == after_reshards:
                started = next((t2 for k2, t2 in ev[i:] if k2 == "started"), None)
                ready = next((t2 for k2, t2 in ev[i:] if k2 == "ready"), None)
                if started is None or ready is None or ready < started:
                    return None
                return {"reshard_to_ready": ready - t, "engine_start_to_ready": ready - started}
    return None


class Server:
    def __init__(self, name: str, tmp: Path, argv_tail: list[str], model: str):
        self.name, self.state_dir, self.model = name, tmp / name, model
        self.http = f"127.0.0.1:{free_port(1)}"
        argv = [PY, "-m", "zswarm", "server", "--name", name, "--state-dir", str(self.state_dir),
                "--address", self.http, "--threads", "1", "--no-local-layers", *argv_tail]
        self.child = Child(name, argv, tmp, False)

    def status(self) -> dict:
        return call(str(self.state_dir), "status", timeout_s=3)

    def ready(self, n_workers: int, min_reshards: int = 0) -> bool:
        st = self.status()
        sh = st.get("shard") or {}
        return (st["children"]["engine"]["state"] == "ready" and not sh.get("pending")
                and len(sh.get("workers", [])) == n_workers and sh.get("n_layers", 0) > 0
                and sh.get("reshards", 0) >= min_reshards)

    def wait_http(self, timeout_s: float) -> None:
        def ok():
            stream_completion(self.http, self.model, "Hi", 1, 60)
            return True
        wait_for(lambda: _quiet(ok), timeout_s, interval_s=0.5, what=f"{self.name}'s API", check=self.child.check)


def _quiet(fn):
    try:
        return fn()
    except (RuntimeError, OSError, http.client.HTTPException, ValueError):
        return False


# --- request/reply round trips through a tunnel and over plain TCP, right now ---

class ReplyServer:
    """TCP on 127.0.0.1: for each request of ``req`` bytes, a reply of ``rep`` bytes (one connection)."""

    def __init__(self, req: int, rep: int):
        self.req, self.reply = req, b"r" * rep
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(30)
        self.port = self.lsock.getsockname()[1]
        self.t = threading.Thread(target=self._serve, daemon=True)
        self.t.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.lsock.accept()
        except OSError:
            return
        conn.settimeout(30)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                got = 0
                while got < self.req:
                    d = conn.recv(1 << 20)
                    if not d:
                        return
                    got += len(d)
                conn.sendall(self.reply)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.lsock.close()
        self.t.join(35)


def ping(port: int, req: int, rep: int, n: int) -> list[float]:
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg, buf, out = b"q" * req, bytearray(1 << 20), []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            c.sendall(msg)
            got = 0
            while got < rep:
                k = c.recv_into(buf)
                if not k:
                    raise RuntimeError("the reply server closed")
                got += k
            out.append(time.perf_counter() - t0)
    finally:
        c.close()
    return out


def round_trips(keys, sizes: list[tuple[int, int]], n: int) -> dict:
    """{(req, rep): {"tcp": [s...], "tunnel": [s...]}}: each over plain TCP, then through a
    TunnelEntry -> TunnelExit pair (each end in its own ZeroMQ context, both in this process)."""
    out: dict = {}
    for req, rep in sizes:
        out[(req, rep)] = {}
        srv = ReplyServer(req, rep)
        try:
            out[(req, rep)]["tcp"] = ping(srv.port, req, rep, n)
        finally:
            srv.close()
        srv = ReplyServer(req, rep)
        wctx, sctx, stats = zmq.Context(), zmq.Context(), Stats()
        zap = ZapHandler(wctx, keys, stats)
        zap.start()
        ex = TunnelExit(wctx, keys, "127.0.0.1:0", ("127.0.0.1", srv.port), stats)
        en = TunnelEntry(sctx, keys, "127.0.0.1:1", stats)  # replaced below once the exit is bound
        try:
            ex.start()
            en = TunnelEntry(sctx, keys, ex.endpoint, stats)
            en.start()
            if not en.wait_connected(10):
                raise TimeoutError("the test tunnel did not connect")
            out[(req, rep)]["tunnel"] = ping(en.local_port, req, rep, n)
        finally:
            en.stop()
            ex.stop()
            zap.stop()
            srv.close()
            sctx.destroy(linger=0)
            wctx.destroy(linger=0)
    return out


# --- CPU time and run-queue waits of processes, from /proc/PID/task/TID/schedstat ---

def sched(pids: list[int]) -> tuple[float, float, int]:
    """(ms on a CPU, ms runnable but waiting for a CPU, times scheduled) summed over every thread of ``pids``.
    Threads that ended in between are missed (none of the measured ones do)."""
    run = wait = slices = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                a, b, c = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[:3]
            except (OSError, ValueError):
                continue
            run, wait, slices = run + int(a), wait + int(b), slices + int(c)
    return run / 1e6, wait / 1e6, slices


# --- the run ---

def measure(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="zs-worker-mode-"))
    token = Token.generate()
    keys = token.derive()
    T = token.encode()
    res: dict = {"load_before": loadavg(), "loads": {}, "runs": {}, "counters": [], "node_loads": {},
                 "node_runs": {}, "tmp": str(tmp)}
    ctx = zmq.Context()  # DEALERs to the engines
    tctx = zmq.Context()  # the tunnel entries: the "server side", with its ZAP handler
    stats = Stats()
    zap = ZapHandler(tctx, keys, stats)
    zap.start()
    entries: list[CountingEntry] = []
    engines: dict[str, Engine] = {}
    loads_samples: list[tuple[float, float, float]] = []
    try:
        print("starting 2 RPC servers and 2 workers", file=sys.stderr)
        r1, ep1 = rpc_server("rpc-1", tmp)
        r2, ep2 = rpc_server("rpc-2", tmp)
        w1, p1, t1 = worker("w1", tmp, T, None)
        w2, p2, t2 = worker("w2", tmp, T, p1)
        model = "smollm2-135m-instruct"

        # --- node level ---
        if not args.no_servers:
            print("node level: a static server over the RPC servers, a p2p server over the workers",
                  file=sys.stderr)
            s_b = Server("server-static", tmp, ["--rpc-servers", f"{ep1},{ep2}", "--no-mdns", "--p2p-listen",
                                                f"127.0.0.1:{free_port(3)}"], model)
            wait_for(lambda: s_b.ready(2), args.deadline, what="the static server's engine", check=s_b.child.check)
            s_c = Server("server-p2p", tmp, ["--p2p", "--token", T, "--no-mdns", "--p2p-listen",
                                               f"127.0.0.1:{free_port(3)}", "--reshard-settle", "1",
                                               "--bootstrap", f"127.0.0.1:{p1}"], model)
            try:
                wait_for(lambda: s_c.ready(2, 1), min(30.0, args.deadline), what="the p2p server's split",
                         check=s_c.child.check)
                res["nudged"] = False
            except WaitTimeout:
                # Seen on this machine: a server whose ledger met the workers before its Sharder listened
                # never re-shards by itself (no further membership change comes). Ask once, and say so.
                print("the p2p server did not split by itself within 30 s; asking it to re-shard", file=sys.stderr)
                res["nudged"] = True
                call(str(s_c.state_dir), "reshard", timeout_s=10)
                wait_for(lambda: s_c.ready(2, 1), args.deadline, what="the p2p server's split over w1 and w2",
                         check=s_c.child.check)
            n_first = sum(1 for k, _ in log_events(s_c.child.log()) if k == "reshard")
            first = load_from_log(s_c.child.log(), n_first - 1)  # the split that took both workers
            res["node_first_split"] = first
            static_first = log_events(s_b.child.log())
            st = [t for k, t in static_first if k == "started"]
            rd = [t for k, t in static_first if k == "ready"]
            res["node_static_first"] = (rd[0] - st[0]) if st and rd else None
            servers = {"b": s_b, "c": s_c}
            res["node_layers"] = {v: {w["endpoint"]: w["layers"] for w in (s.status().get("shard") or {})["workers"]}
                                  for v, s in servers.items()}
            res["node_loads"] = {v: [] for v in servers}
            for rep in range(args.load_reps):
                for v in (["b", "c"] if rep % 2 == 0 else ["c", "b"]):
                    s = servers[v]
                    n = sum(1 for k, _ in log_events(s.child.log()) if k == "reshard")
                    call(str(s.state_dir), "reshard", timeout_s=10)
                    # the log says when: a re-sharding line, then the new engine's start and ready
                    got = wait_for(lambda: load_from_log(s.child.log(), n), args.deadline,
                                   what=f"{s.name}'s re-shard", check=s.child.check)
                    wait_for(lambda: s.ready(2), args.deadline, what=f"{s.name} ready again", check=s.child.check)
                    res["node_loads"][v].append(got)
                    print(f"{s.name}: re-shard -> ready {got['reshard_to_ready']:.2f} s "
                          f"(engine start -> ready {got['engine_start_to_ready']:.2f} s)", file=sys.stderr)
            for s in servers.values():
                s.wait_http(args.deadline)
                stream_completion(s.http, model, args.prompt, args.tokens, args.request_timeout)  # warm-up
            res["node_runs"] = {v: [] for v in servers}
            for rep in range(args.reps):
                for v in (["b", "c"] if rep % 2 == 0 else ["c", "b"]):
                    r = stream_completion(servers[v].http, model, args.prompt, args.tokens, args.request_timeout)
                    res["node_runs"][v].append(r)
                    print(f"rep {rep + 1} node {v}: {r['tokens']} tokens in {r['seconds']:.2f} s = "
                          f"{r['tokens'] / r['seconds']:.1f} tokens/s", file=sys.stderr)
            loads_samples.append(loadavg())
            for s in (s_c, s_b):  # their engines let go of the RPC servers
                s.child.stop()

        # --- engine level ---
        for t in (t1, t2):
            e = CountingEntry(tctx, keys, t, stats)
            e.start()
            entries.append(e)
            if not e.wait_connected(15):
                raise TimeoutError(f"the tunnel to {t} did not connect")
        tunnels = ",".join(f"127.0.0.1:{e.local_port}" for e in entries)
        split = ["--tensor-split", "1,1", "--no-local-layers"]
        extra = {"a": [], "b": ["--rpc-servers", f"{ep1},{ep2}", *split], "c": ["--rpc-servers", tunnels, *split]}
        res["loads"] = {v: [] for v in extra}
        res["load_bytes"] = []
        for rep in range(args.load_reps):
            order = list(extra)[rep % 3:] + list(extra)[:rep % 3]
            for v in order:
                c0 = [e.counters() for e in entries]
                e = Engine(v, extra[v], tmp, ctx, args.ctx_size)
                res["loads"][v].append(e.load_s)
                if v == "c":
                    res["load_bytes"].append(sum(diff(e2.counters(), c)["bytes_out"] for e2, c in zip(entries, c0)))
                res.setdefault("layers", {})[v] = e.layers
                print(f"load {rep + 1} {v}: {e.load_s:.2f} s, layers {e.layers}", file=sys.stderr)
                if rep < args.load_reps - 1:
                    e.close()
                else:
                    engines[v] = e
        loads_samples.append(loadavg())
        for e in engines.values():
            e.generate(args.prompt, args.tokens, args.request_timeout)  # warm-up
        res["runs"] = {v: [] for v in engines}
        names = list(engines)
        wrpc = [call(str(tmp / n), "status", timeout_s=3)["children"]["rpc"]["pid"] for n in ("w1", "w2")]
        groups = {v: {"engine": [engines[v].child.proc.pid],
                      "RPC servers": {"a": [], "b": [r1.proc.pid, r2.proc.pid], "c": wrpc}[v],
                      "worker nodes (tunnel exits)": [w1.proc.pid, w2.proc.pid],
                      "this process (client; tunnel entries in (c))": [os.getpid()]} for v in names}
        for rep in range(args.reps):
            order = names[rep % 3:] + names[:rep % 3]
            for v in order:
                c0 = [e.counters() for e in entries]
                s0 = {g: sched(pids) for g, pids in groups[v].items()}
                r = engines[v].generate(args.prompt, args.tokens, args.request_timeout)
                r["sched"] = {g: [b - a for a, b in zip(s0[g], sched(pids))] for g, pids in groups[v].items()}
                if v == "c":
                    r["counters"] = [diff(e.counters(), c) for e, c in zip(entries, c0)]
                res["runs"][v].append(r)
                print(f"rep {rep + 1} {v}: {r['tokens']} tokens in {r['seconds']:.2f} s = "
                      f"{r['tokens'] / r['seconds']:.1f} tokens/s" +
                      (f", tunnel turns {sum(x['turns'] for x in r['counters'])}" if v == "c" else ""),
                      file=sys.stderr)
            loads_samples.append(loadavg())
        # the other variants idle while one runs: the counters of (c) come from its own requests only
        for e in engines.values():
            e.close()
        engines.clear()
        # what one round trip of (c)'s per-token sizes costs, tunnel vs. TCP, with nothing else of ours running
        per_turn = [(e["bytes_out"] // max(1, e["turns"]), e["bytes_in"] // max(1, e["turns"]))
                    for e in res["runs"]["c"][-1]["counters"]]
        res["rt_sizes"] = [(64, 64)] + per_turn
        res["rt"] = round_trips(keys, res["rt_sizes"], args.pings)
        res["tunnel_stats"] = stats.snapshot()
        res["load_during"] = statistics.mean(x[0] for x in loads_samples) if loads_samples else float("nan")
        res["load_after"] = loadavg()
        return res
    finally:
        for e in engines.values():
            try:
                e.close()
            except Exception as ex:
                print(f"warning: {ex}", file=sys.stderr)
        stop_all()
        for e in entries:
            e.stop()
        zap.stop()
        ctx.destroy(linger=0)
        tctx.destroy(linger=0)
        if args.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict]) -> dict:
    tps = [r["tokens"] / r["seconds"] for r in runs]
    return {"tps": med(tps), "lo": min(tps), "hi": max(tps),
            "ttft_ms": med([r["ttft"] * 1000 for r in runs]),
            "decode": med([(r["tokens"] - 1) / (r["seconds"] - r["ttft"]) for r in runs]),
            "ms_per_token": med([r["seconds"] / r["tokens"] * 1000 for r in runs]),
            "tokens": sorted({r["tokens"] for r in runs})}


def report(res: dict, args: argparse.Namespace) -> tuple[str, str]:
    names = {"a": "(a) single node", "b": "(b) 2 RPC servers, direct", "c": "(c) 2 workers, zswarm tunnels"}
    ref_text = res["runs"]["a"][0]["text"]
    s = {v: summarize(r) for v, r in res["runs"].items()}
    rows = ["| variant | load (s), median | load (s), all | tokens/s (median) | min - max | decode tokens/s | "
            "first token (ms) | ms/token | same text as (a) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for v, title in names.items():
        loads = res["loads"][v]
        same = all(r["text"] == ref_text for r in res["runs"][v])
        rows.append(f"| {title} | {med(loads):.2f} | {' / '.join(f'{x:.2f}' for x in loads)} | {s[v]['tps']:.1f} | "
                    f"{s[v]['lo']:.1f} - {s[v]['hi']:.1f} | {s[v]['decode']:.1f} | {s[v]['ttft_ms']:.0f} | "
                    f"{s[v]['ms_per_token']:.2f} | {'yes' if same else 'NO'} |")
    tps_ratio = s["c"]["tps"] / s["b"]["tps"]
    load_ratio = med(res["loads"]["c"]) / med(res["loads"]["b"])
    # round by round (the variants of one round ran back to back): steadier on a machine whose load drifts
    tps_rounds = [(c["tokens"] / c["seconds"]) / (b["tokens"] / b["seconds"])
                  for b, c in zip(res["runs"]["b"], res["runs"]["c"])]
    load_rounds = [c / b for b, c in zip(res["loads"]["b"], res["loads"]["c"])]
    verdict = (f"(c)/(b): tokens/s {tps_ratio:.2f} (aim >= 0.95: {'met' if tps_ratio >= 0.95 else 'missed'}; "
               f"round by round {' '.join(f'{x:.2f}' for x in tps_rounds)}), "
               f"load time {load_ratio:.2f} (aim <= 1.2: {'met' if load_ratio <= 1.2 else 'missed'}; "
               f"round by round {' '.join(f'{x:.2f}' for x in load_rounds)}); "
               f"(b)/(a): tokens/s {s['b']['tps'] / s['a']['tps']:.2f}, load time "
               f"{med(res['loads']['b']) / med(res['loads']['a']):.2f}")

    node_rows, node_verdict = [], ""
    if res.get("node_runs"):
        ns = {v: summarize(r) for v, r in res["node_runs"].items()}
        node_rows = ["| variant | re-shard -> ready (s), median | all | engine start -> ready (s), median | "
                     "tokens/s (median) | min - max | first token (ms) | same text as (a) |",
                     "|---|---:|---|---:|---:|---:|---:|---|"]
        titles = {"b": "static `zswarm server --rpc-servers` over (b)'s RPC servers",
                  "c": "`zswarm server --p2p` over the 2 workers (its own tunnels)"}
        for v, title in titles.items():
            nl = res["node_loads"][v]
            rr = [x["reshard_to_ready"] for x in nl]
            er = [x["engine_start_to_ready"] for x in nl]
            same = all(r["text"] == ref_text for r in res["node_runs"][v])
            node_rows.append(f"| {title} | {med(rr):.2f} | {' / '.join(f'{x:.2f}' for x in rr)} | {med(er):.2f} | "
                             f"{ns[v]['tps']:.1f} | {ns[v]['lo']:.1f} - {ns[v]['hi']:.1f} | {ns[v]['ttft_ms']:.0f} | "
                             f"{'yes' if same else 'NO'} |")
        first = res.get("node_first_split") or {}
        nr_tps = ns["c"]["tps"] / ns["b"]["tps"]
        nr_load = med([x["reshard_to_ready"] for x in res["node_loads"]["c"]]) / \
            med([x["reshard_to_ready"] for x in res["node_loads"]["b"]])
        nr_rounds = [(c["tokens"] / c["seconds"]) / (b["tokens"] / b["seconds"])
                     for b, c in zip(res["node_runs"]["b"], res["node_runs"]["c"])]
        node_verdict = (f"Node level, p2p/static: tokens/s {nr_tps:.2f} (round by round "
                        f"{' '.join(f'{x:.2f}' for x in nr_rounds)}), re-shard -> ready {nr_load:.2f}. "
                        + ("The p2p server did NOT split over the workers by itself within 30 s (its ledger met "
                           "the workers before its Sharder listened, so no membership change ever reached it); it "
                           "was asked to re-shard through the admin socket. " if res.get("nudged") else "") +
                        f"The p2p server's first split (workers found through the ledger, settle 1 s): re-shard "
                        f"-> ready {first.get('reshard_to_ready', float('nan')):.2f} s (engine start -> ready "
                        f"{first.get('engine_start_to_ready', float('nan')):.2f} s); the static server's first "
                        f"load, engine start -> ready {res.get('node_static_first') or float('nan'):.2f} s.")

    # diagnosis
    runs_c = res["runs"]["c"]
    turns = [sum(x["turns"] for x in r["counters"]) / r["tokens"] for r in runs_c]
    msgs_out = [sum(x["msgs_out"] for x in r["counters"]) / r["tokens"] for r in runs_c]
    msgs_in = [sum(x["msgs_in"] for x in r["counters"]) / r["tokens"] for r in runs_c]
    per_worker = [{k: med([r["counters"][i][k] / r["tokens"] for r in runs_c]) for k in ("turns", "bytes_out", "bytes_in")}
                  for i in range(2)]
    gap_ms = s["c"]["ms_per_token"] - s["b"]["ms_per_token"]
    rt = med(turns)
    implied_us = gap_ms * 1000 / rt if rt else float("nan")

    def kib(n: float) -> str:
        return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"

    rt_rows = ["| request -> reply | TCP median (us) | TCP p99 (us) | tunnel median (us) | tunnel p99 (us) | "
               "added by the tunnel, median (us) |", "|---|---:|---:|---:|---:|---:|"]
    added = {}
    for size in res["rt_sizes"]:
        got = res["rt"][tuple(size)]
        tcp, tun = sorted(got["tcp"]), sorted(got["tunnel"])
        p99 = lambda xs: xs[int(0.99 * (len(xs) - 1))] * 1e6  # noqa: E731
        added[tuple(size)] = (med(tun) - med(tcp)) * 1e6
        rt_rows.append(f"| {kib(size[0])} -> {kib(size[1])} | {med(tcp) * 1e6:.0f} | {p99(tcp):.0f} | "
                       f"{med(tun) * 1e6:.0f} | {p99(tun):.0f} | {added[tuple(size)]:+.0f} |")
    expect_ms = sum(added[tuple(sz)] * w["turns"] for sz, w in zip(res["rt_sizes"][1:], per_worker)) / 1000

    groups = list(res["runs"]["c"][0]["sched"])
    sched_rows = ["| variant | " + " | ".join(groups) + " | all of them |", "|---|" + "---:|" * (len(groups) + 1)]
    per_tok: dict = {}
    for v in ("a", "b", "c"):
        cells, tot_run, tot_wait = [], 0.0, 0.0
        for g in groups:
            run = med([r["sched"][g][0] / r["tokens"] for r in res["runs"][v]])
            wait = med([r["sched"][g][1] / r["tokens"] for r in res["runs"][v]])
            per_tok[(v, g)] = (run, wait)
            tot_run, tot_wait = tot_run + run, tot_wait + wait
            cells.append(f"{run:.2f} / {wait:.2f}")
        per_tok[(v, "all")] = (tot_run, tot_wait)
        sched_rows.append(f"| {v} | " + " | ".join(cells) + f" | {tot_run:.2f} / {tot_wait:.2f} |")
    d_run = per_tok[("c", "all")][0] - per_tok[("b", "all")][0]
    d_wait = per_tok[("c", "all")][1] - per_tok[("b", "all")][1]
    load_mb = med(res["load_bytes"]) / 1e6 if res["load_bytes"] else float("nan")
    load_gap = med(res["loads"]["c"]) - med(res["loads"]["b"])
    diag = (f"Per generated token, llama.cpp made {rt:.1f} RPC round trips through the tunnels, one per worker "
            f"and graph ({per_worker[0]['turns']:.1f} to w1: {kib(per_worker[0]['bytes_out'])} out, "
            f"{kib(per_worker[0]['bytes_in'])} back; {per_worker[1]['turns']:.1f} to w2: "
            f"{kib(per_worker[1]['bytes_out'])} out, {kib(per_worker[1]['bytes_in'])} back; "
            f"{med(msgs_out):.1f} DATA messages out and {med(msgs_in):.1f} back). "
            f"(c) - (b) = {gap_ms:+.2f} ms per token (medians), {implied_us:+.0f} us per round trip; the same "
            f"request/reply sizes through a tunnel in this process, after the engines stopped, added "
            f"{expect_ms:.2f} ms per token in all (table below)"
            + (": round trips are few, so the tunnel's latency per message explains only part of the gap. "
               if gap_ms > 2 * expect_ms else ", in line with the gap. ") +
            f"The tunnel also puts CPU work on the critical path (CURVE and Python at both ends: four more threads "
            f"to wake each way), on a machine whose 2 cores were shared (mean load average {res['load_during']:.1f}): "
            f"per token, (c) used {d_run:+.2f} ms more CPU than (b) over every process involved, and its threads "
            f"spent {d_wait:+.2f} ms more runnable but waiting for a core. "
            f"Loading pushed {load_mb:.0f} MB through the tunnels (median per load); (c) - (b) load time = "
            f"{load_gap:+.2f} s" + (f", as if those bytes crossed at {load_mb / load_gap:.0f} MB/s (the tunnel "
                                     f"benchmark's figure for one stream on this machine is ~170 MB/s, plain "
                                     f"TCP ~1400 MB/s)" if load_gap > 0.05 else "") + ".")
    la_b, la_a = res["load_before"], res["load_after"]
    printed = "\n".join(rows + ["", verdict, ""] + (node_rows + ["", node_verdict, ""] if node_rows else [])
                        + [diag, ""] + rt_rows + [""] + sched_rows + [
                        "", f"load average before {la_b[0]:.2f}, during {res['load_during']:.2f}, after {la_a[0]:.2f}"])

    layers = res.get("layers", {})
    doc = f"""## Worker mode: one node vs. llama.cpp RPC vs. zswarm tunnels

Command (repository root): `{command_line()}`
Date: {now_utc()}. Machine: {machine()}.
Load average (1, 5, 15 min) before: {' '.join(f'{x:.2f}' for x in la_b)}; mean 1-minute load during: {res['load_during']:.2f}; after: {' '.join(f'{x:.2f}' for x in la_a)} (other work was running on this 2-core machine: absolute figures swing with it, the variants take turns so the ratios are steadier).

The embedded SmolLM2-135M-Instruct (Q4_1), {args.tokens} new tokens for the prompt {json.dumps(args.prompt)}
(greedy, n_ctx {args.ctx_size}, 1 thread everywhere: engine, RPC servers, workers). Engine level: an engine child
(`python -m zswarm.engine.proc`) driven over its ipc DEALER with zswarm.wire messages. **(a)** the whole model
on the engine's CPU; **(b)** `--rpc-servers` straight at two `zswarm.engine.rpc_server` processes (llama.cpp RPC
over loopback TCP); **(c)** two real `zswarm worker --token T` nodes, reached through two `TunnelEntry`s that this
script opens to the workers' CURVE tunnel exits (as a server node does); (b) and (c) split 1:1 with
`--no-local-layers` (layers per RPC server: {' + '.join(str(n) for k, n in (layers.get('b') or {}).items() if k != 'local')}
in (b), {' + '.join(str(n) for k, n in (layers.get('c') or {}).items() if k != 'local')} in (c)). Load = engine spawn -> READY
({args.load_reps} loads each, taking turns); tokens/s = completion tokens / request time, {args.reps} requests each
with all three engines loaded, taking turns, after one warm-up; decode tokens/s leaves out the first token.

{chr(10).join(rows)}

{verdict}.

Reference (llama.cpp's own figures, tinyllama F16 on other hardware): 63 tokens/s local, 60 over RPC on
localhost, 42 over 1 GbE.
"""
    if node_rows:
        doc += f"""
Node level, on the same RPC servers and workers (before the engine level): a static `zswarm server --rpc-servers`
over (b)'s two RPC servers, and a `zswarm server --p2p --reshard-settle 1` that finds the two workers through the
ledger and opens its own tunnels; both `--no-local-layers --threads 1`. Load = the server's `re-sharding` log line ->
`engine: ready` for re-shards asked through the admin socket ({args.load_reps} each, taking turns; includes stopping
the old engine); tokens/s: streamed `POST /v1/completions`, {args.reps} each, taking turns.

{chr(10).join(node_rows)}

{node_verdict}
"""
    doc += f"""
Diagnosis. This script's tunnel entries count each stream's DATA messages and *turns* (a reply after a
request: a round trip llama.cpp waited for). {diag}

Round trips of one connection through a TunnelEntry -> TunnelExit pair (both in this process, each in its own
ZeroMQ context) and over plain loopback TCP, with the request/reply sizes of (c)'s per-token traffic, measured
after the engines stopped ({args.pings} each):

{chr(10).join(rt_rows)}

CPU time / run-queue wait (runnable, waiting for a core) per generated token, in ms, by process (all threads,
from /proc/PID/task/*/schedstat, medians over the requests; the worker nodes idle in (a) and (b), and this
process is only the client there):

{chr(10).join(sched_rows)}
"""
    return printed, doc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128, help="new tokens per request (default 128)")
    p.add_argument("--reps", type=int, default=5, help="timed requests per variant (default 5)")
    p.add_argument("--load-reps", type=int, default=3, help="loads per variant (default 3)")
    p.add_argument("--prompt", default=COUNT_PROMPT, help="the completion prompt (default: %(default)r)")
    p.add_argument("--ctx-size", type=int, default=2048, help="engine context (default 2048, as a server)")
    p.add_argument("--pings", type=int, default=1000, help="request/reply round trips per size, over TCP and through a tunnel (default 1000)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds allowed per request")
    p.add_argument("--no-servers", action="store_true", help="skip the node-level (real server) part")
    add_run_options(p, deadline_s=180.0, deadline_help="seconds allowed for any node or load",
                    keep_help="keep the logs (a temporary folder)")
    return measure_and_publish(KEY, p.parse_args(), measure, report)


if __name__ == "__main__":
    sys.exit(main())
