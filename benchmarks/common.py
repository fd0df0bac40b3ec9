"""What the benchmark scripts in this folder share: starting and stopping zswarm nodes and their
processes, free ports, waiting with a deadline, a streaming ``/v1/completions`` client, describing
the machine and the command, and writing a script's section of docs/BENCHMARKS.md.

Importing it puts the repository root on ``sys.path``, so the scripts can import ``zswarm``, and
``tests/`` after this folder: free ports and waiting come from ``tests/cluster.py``, the test
suite's helpers (standard library and ``zswarm.admin_client`` only, no pytest), so benchmarks and
tests wait and pick ports one way.
Nodes started with ``stand_in=True`` run the stand-in engine of ``fake_engine.py``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import http.client
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:  # after this folder: a script's own modules come first
    sys.path.append(str(ROOT / "tests"))

import cluster  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
FAKE_ENGINE = Path(__file__).resolve().parent / "fake_engine.py"
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long (a node gives gunicorn 5 s itself)


# --- ports and waiting (tests/cluster.py's) ---

# Above the kernel's ephemeral range (32768-60999), so never a port it hands to an outgoing
# connection, and away from the 20000-32000 the test suite uses: a benchmark and the suite can
# run side by side.
free_port = cluster.PortRange(61000, 65000).free

# What a starting node may answer before it is up: no admin socket yet, a status without the part
# asked for, an HTTP port that refuses or hangs up. Anything else is a bug and fails at once.
NOT_YET = cluster.NOT_YET + (KeyError, TypeError, http.client.HTTPException)
wait_for = functools.partial(cluster.wait_for, interval_s=0.1, retry=NOT_YET)
WaitTimeout = cluster.WaitTimeout


class NodeDied(RuntimeError):
    pass


# --- a streaming client of the OpenAI API ---

def stream_completion(address: str, model: str, prompt: str, tokens: int, timeout_s: float) -> dict:
    """One streamed ``POST /v1/completions`` (temperature 0, top_p 1, usage included) over
    ``http.client``, timed from sending the request (after connecting) to ``data: [DONE]``."""
    host, port = address.rsplit(":", 1)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "top_p": 1,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        conn.connect()  # connection set-up is not part of the request (a client keeps it alive)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{address}: HTTP {resp.status}: {resp.read()[:300]!r}")
        first, text, usage, finish = None, [], None, None
        while True:
            line = resp.readline()
            if not line:
                raise RuntimeError(f"{address}: the stream ended without [DONE]")
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{address}: {event['error']}")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    if first is None:
                        first = time.perf_counter()
                    text.append(choice["text"])
                finish = choice.get("finish_reason") or finish
        end = time.perf_counter()
    finally:
        conn.close()
    return {"seconds": end - t0, "ttft": (first or end) - t0, "tokens": (usage or {}).get("completion_tokens", 0),
            "text": "".join(text), "finish": finish}


# --- processes ---

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


def terminate_all(procs: Iterable[tuple[str, subprocess.Popen]], grace_s: float, warn: bool = False) -> None:
    """SIGTERM every (name, process) still running, wait up to ``grace_s`` for them all, then
    SIGKILL (and reap) those left."""
    procs = list(procs)
    for _, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for name, proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if warn:
                print(f"{name} did not stop on SIGTERM within {grace_s} s; killing it", file=sys.stderr)
            proc.kill()
            proc.wait(5)


def die_with_parent() -> None:
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


# --- running nodes (the benchmark's process) ---

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
        cmd = ([sys.executable, str(FAKE_ENGINE), "node", *args] if stand_in
               else [sys.executable, "-m", "zswarm", *args])
        log = self.tmp / f"{name}.log"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=full_env, cwd=ROOT, preexec_fn=die_with_parent)
        node = Node(name, role, state, f"127.0.0.1:{port}", http, proc, log)
        self.nodes.append(node)
        return node

    def check(self, node: Node) -> None:
        if node.proc.poll() is not None:
            tail = node.log.read_text(errors="replace").splitlines()[-15:] if node.log.exists() else []
            raise NodeDied(f"{node.name} exited with status {node.proc.returncode}; the end of its log:\n"
                           + "\n".join(tail))

    def wait_routes(self, node: Node, model: str, n: int, timeout_s: float) -> None:
        wait_for(lambda: len(node.routes(model)) >= n, timeout_s, what=f"{node.name} to route {model} to {n} node(s)",
                 check=lambda: self.check(node))

    def wait_http(self, node: Node, model: str, timeout_s: float) -> None:
        """Until ``GET /v1/models`` on the node's API lists ``model`` (gunicorn is up)."""
        def listed() -> bool:
            host, port = node.http.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
            try:
                conn.request("GET", "/v1/models")
                resp = conn.getresponse()
                return resp.status == 200 and model.encode() in resp.read()
            finally:
                conn.close()
        wait_for(listed, timeout_s, what=f"{node.name}'s API to list {model}", check=lambda: self.check(node))

    def stop(self, node: Node) -> None:
        stop_procs([node])
        self.nodes.remove(node)

    def close(self) -> None:
        stop_procs(self.nodes)
        self.nodes.clear()
        if not self.keep:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)


def stop_procs(nodes: list[Node]) -> None:
    """SIGTERM every node, wait up to STOP_GRACE_S, SIGKILL what is left, children included."""
    below = {n.name: descendants(n.proc.pid) for n in nodes}
    terminate_all([(n.name, n.proc) for n in nodes], STOP_GRACE_S, warn=True)
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
    """The load averages (1, 5, 15 min) as /proc/loadavg writes them; "?" if unknown."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def load_values() -> tuple[float, float, float]:
    """The load averages (1, 5, 15 min) as numbers; nan if unknown."""
    try:
        a, b, c = Path("/proc/loadavg").read_text().split()[:3]
        return float(a), float(b), float(c)
    except (OSError, ValueError):
        return (float("nan"),) * 3


def machine(*extra: str, unknown_cpu: str = "?") -> str:
    """nproc, CPU model, kernel and Python, then ``extra`` (library versions, say)."""
    cpu = unknown_cpu
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return ", ".join([f"nproc {os.cpu_count()}", cpu, f"Linux {platform.release()}",
                      f"Python {platform.python_version()}", *extra])


def command_line() -> str:
    """This run's command, as run from the repository root with the project's virtual environment."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    return shlex.join([".venv/bin/python", script_text, *sys.argv[1:]])


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def replace_in_doc(start: str, end: str, body: str) -> None:
    """Put ``body`` (which begins with ``start`` and ends with ``end``) in place of the text between
    those markers in docs/BENCHMARKS.md, or at its end, re-reading the file right before (other
    scripts write their own sections); the file is replaced at once."""
    doc = DOC.read_text() if DOC.exists() else (
        "# zswarm benchmarks\n\nEach section is written by one script in `benchmarks/` between its own "
        "markers; rerun the command it shows to refresh it.\n")
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        doc = head + body + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + body + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_name(f".BENCHMARKS.md.{os.getpid()}.tmp")
    tmp.write_text(doc)
    os.replace(tmp, DOC)


def write_section(key: str, text: str) -> None:
    """Replace this benchmark's section of docs/BENCHMARKS.md (between its ``<!-- key:start -->``
    and ``<!-- key:end -->`` markers), leaving the rest of the file as it is at this moment."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    replace_in_doc(start, end, f"{start}\n{text.strip()}\n{end}")


def add_run_options(p: argparse.ArgumentParser, deadline_s: float,
                    deadline_help: str = "seconds allowed for the nodes to come up",
                    keep_help: str = "keep the nodes' state directories and logs") -> None:
    """``--deadline``, ``--keep`` and ``--write``, which every benchmark that starts nodes takes."""
    p.add_argument("--deadline", type=float, default=deadline_s, help=deadline_help)
    p.add_argument("--keep", action="store_true", help=keep_help)
    p.add_argument("--write", action="store_true", help="write the figures into docs/BENCHMARKS.md")


def measure_and_publish(key: str, args: argparse.Namespace, measure: Callable[[argparse.Namespace], Any],
                        report: Callable[[Any, argparse.Namespace], tuple[str, str]]) -> int:
    """A benchmark's main after its options: ``report(measure(args), args)`` gives the printed
    figures and the doc section, which :func:`publish` prints and (with ``--write``) writes. SIGTERM
    ends it through its ``finally`` blocks, so its nodes are stopped too."""
    exit_on_sigterm()
    printed, doc = report(measure(args), args)
    publish(key, printed, doc, args.write)
    return 0


def publish(key: str, printed: str, doc: str, write: bool) -> None:
    """Print the figures; with ``write``, also replace the benchmark's section of docs/BENCHMARKS.md."""
    print(printed)
    if write:
        write_section(key, doc)
        print("wrote docs/BENCHMARKS.md", file=sys.stderr)
