"""Membership at scale: how fast N zswarm nodes on one machine find each other and notice a death.

For each N in ``--sizes`` (default 8,16,32) the script starts N node processes on 127.0.0.1 with
mDNS off, each bootstrapped to ONE random earlier node (the first knows nobody), state directories
in a temporary folder. Nodes are ``zswarm worker`` (gossip ledger, discovery, admin, and a llama.cpp
RPC server child); ``--role federated`` has a gateway, balancer and HTTP child instead (a ``server``
would also load a model, so it is not offered). Nodes are watched only through their admin sockets:

1. Convergence. The first N-1 processes are spawned back to back; once all of them answer on their
   admin socket, the last one is spawned. Converged: every node lists all N-1 others as alive, with
   their full record. Timed from the first spawn and from the last spawn. Join latency: from the
   last node's spawn, and from its "up" moment (its admin socket first answers), until every other
   node lists it alive.
2. Failure detection. SIGKILL one random node (not the first); time until every survivor lists it
   as suspect (or worse), and as dead.
3. Gossip traffic. Counters gossip_out_bytes / gossip_in_bytes of every node over a 5 s quiet window
   after convergence, as mean bytes per node per second; also the CPU the N nodes (children
   included) and the whole machine used in that window (from /proc; 100% = one core; other work
   running shows as the difference), and "false suspects": how often any node logged a live peer
   going alive -> suspect, until convergence / after it.

Nodes are polled in parallel, each until its condition first holds (then left alone: on a healthy
cluster these conditions do not undo themselves); a last sweep checks they all still hold. "poll"
is how long the first sweep over all nodes took: the resolution of the times. Every wait has a
deadline (``--deadline``, 60 s); a figure not reached reads "timeout". Every child is stopped at
the end (SIGTERM, then SIGKILL), whatever happened.

Run from the repository root:
    .venv/bin/python benchmarks/membership.py --sizes 8,16,32 [--write]
``--write`` replaces this benchmark's section of docs/BENCHMARKS.md (between its markers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, DOC, command_line, free_port, machine as common_machine, replace_in_doc  # noqa: E402
from common import terminate_all  # noqa: E402
from zswarm.admin_client import AdminFailed, AdminUnavailable, call  # noqa: E402

POLL_S = 0.02  # pause between sweeps, so that polling does not starve the nodes
WINDOW_S = 5.0  # the quiet window for traffic and CPU
START, END = "<!-- membership:start -->", "<!-- membership:end -->"
COLUMNS = {"N": "N", "up": "N-1 up (s)", "conv_first": "conv from 1st spawn (s)",
           "conv_last": "conv from last spawn (s)", "join_spawn": "join from spawn (s)",
           "join_up": "join from up (s)", "suspect": "suspect (s)", "dead": "dead (s)",
           "out_bps": "out B/node/s", "in_bps": "in B/node/s", "cpu": "CPU % nodes",
           "host_cpu": "CPU % host", "false_suspects": "false suspects start/steady", "poll_ms": "poll (ms)"}


class Timeout(Exception):
    pass


@dataclass
class Node:
    name: str
    state_dir: str
    port: int
    proc: subprocess.Popen
    spawned: float
    up: float | None = None
    id: str = ""

    def ask(self, command: str) -> object | None:
        """One admin call; None while the node does not answer."""
        try:
            return call(self.state_dir, command, timeout_s=2.0)
        except (AdminUnavailable, AdminFailed):
            return None


class Cluster:
    def __init__(self, tmp: str, deadline_s: float, role: str, root: Path = ROOT):
        """``root``: the source tree the nodes run (signing.py runs an older checkout beside this one)."""
        self.tmp, self.deadline_s, self.role, self.root = tmp, deadline_s, role, Path(root)
        self.token = subprocess.run([sys.executable, "-m", "zswarm", "token", "new"], cwd=ROOT, check=True,
                                    capture_output=True, text=True, timeout=30).stdout.strip()
        self.nodes: list[Node] = []
        self.sweep_s = 0.0  # the first sweep of the last watch()
        self.children: dict[int, str] = {}  # the nodes' own children: pid -> start time
        self.orphans = 0  # children still running once their node had exited
        self._pool = ThreadPoolExecutor(max_workers=16)

    def spawn(self) -> Node:
        name, port = f"n{len(self.nodes):02d}", free_port(2)
        state_dir = os.path.join(self.tmp, name)
        cmd = [sys.executable, "-m", "zswarm", self.role, "--token", self.token, "--no-mdns",
               "--p2p-listen", f"127.0.0.1:{port}", "--state-dir", state_dir, "--name", name]
        if self.role == "federated":
            cmd += ["--address", f"127.0.0.1:{free_port(2)}"]
        if self.nodes:
            cmd += ["--bootstrap", f"127.0.0.1:{random.choice(self.nodes).port}"]
        with open(self.log_path(name), "wb") as log:
            proc = subprocess.Popen(cmd, cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONPATH": str(self.root)})
        self.nodes.append(Node(name, state_dir, port, proc, time.monotonic()))
        return self.nodes[-1]

    def log_path(self, name: str) -> str:
        return os.path.join(self.tmp, name + ".log")

    def wait_up(self, nodes: list[Node]) -> None:
        deadline = time.monotonic() + self.deadline_s
        while pending := [n for n in nodes if n.up is None]:
            if time.monotonic() > deadline:
                raise Timeout(f"{len(pending)} of {len(nodes)} nodes never answered on their admin socket")
            for n in pending:
                if n.proc.poll() is not None:
                    tail = Path(self.log_path(n.name)).read_text(errors="replace").strip().splitlines()[-1:]
                    raise RuntimeError(f"{n.name} exited with status {n.proc.returncode}: {' '.join(tail)}")
                if status := n.ask("status"):
                    n.up, n.id = time.monotonic(), status["id"]
            time.sleep(0.005)

    def peers(self, nodes: list[Node]) -> list[tuple[Node, dict | None, float]]:
        """Ask all nodes at once: (node, its peers by id or None, when the answer came)."""
        def one(n: Node) -> tuple[Node, dict | None, float]:
            peers = n.ask("peers")
            return n, None if peers is None else {p["id"]: p for p in peers}, time.monotonic()
        return list(self._pool.map(one, nodes))

    def watch(self, nodes: list[Node], conditions: dict[str, Callable[[Node, dict], bool]]) -> dict:
        """Poll until every condition holds on every node; per condition, when it first held on the
        last of them (None on timeout)."""
        first: dict[str, dict[str, float]] = {c: {} for c in conditions}
        done = lambda: all(len(first[c]) == len(nodes) for c in conditions)  # noqa: E731
        self.sweep_s, deadline = 0.0, time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            sweep = time.monotonic()
            for n, peers, at in self.peers([n for n in nodes if any(n.name not in f for f in first.values())]):
                for c, holds in conditions.items():
                    if peers is not None and n.name not in first[c] and holds(n, peers):
                        first[c][n.name] = at
            self.sweep_s = self.sweep_s or time.monotonic() - sweep
            if done():
                for n, peers, _ in self.peers(nodes):  # a last sweep: do they all still hold?
                    for c, holds in conditions.items():
                        if peers is None or not holds(n, peers):
                            first[c].pop(n.name, None)
                if done():
                    break
            time.sleep(POLL_S)
        return {c: max(t.values()) if len(t) == len(nodes) else None for c, t in first.items()}

    def suspects(self) -> list[list[str]]:
        """Per node, the ids in its log's "peer ID: alive -> suspect" lines, in order."""
        return [re.findall(r"peer (\w+): alive -> suspect", Path(self.log_path(n.name)).read_text(errors="replace"))
                for n in self.nodes]

    def note_children(self) -> None:
        table = processes()
        pids = [n.proc.pid for n in self.nodes]
        self.children |= {p: table[p][2] for p in tree(table, pids) - set(pids) if p in table}

    def stop(self) -> None:
        self.note_children()
        terminate_all([(n.name, n.proc) for n in self.nodes], 10.0)
        deadline = time.monotonic() + 5.0  # a node's children should go with it; those that do not, we end
        while left := [p for p, start in self.children.items() if processes().get(p, (0, 0, ""))[2] == start]:
            if time.monotonic() > deadline:
                self.orphans = len(left)
                for p in left:
                    os.kill(p, signal.SIGKILL)
                break
            time.sleep(0.2)
        self._pool.shutdown()


def processes() -> dict[int, tuple[int, int, str]]:
    """Every process: pid -> (parent pid, CPU ticks used, start time)."""
    table = {}
    for pid in (int(e) for e in os.listdir("/proc") if e.isdigit()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        table[pid] = int(fields[1]), int(fields[11]) + int(fields[12]), fields[19]
    return table


def tree(table: dict, pids: list[int]) -> set[int]:
    """These processes and all their descendants."""
    mine, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo += [c for c, (pp, _, _) in table.items() if pp == pid and c not in mine]
    return mine


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds used so far by these processes and their descendants (a worker's RPC server)."""
    table = processes()
    return sum(table[p][1] for p in tree(table, pids) if p in table) / os.sysconf("SC_CLK_TCK")


def host_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, all cores)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(size: int, deadline_s: float, role: str) -> dict:
    row: dict = {"N": size}
    with tempfile.TemporaryDirectory(prefix="zswarm-membership-") as tmp:
        cluster = Cluster(tmp, deadline_s, role)
        try:
            run(cluster, size, row)
        except (Timeout, RuntimeError) as e:
            row["note"] = str(e)
        finally:
            cluster.stop()
    if cluster.orphans:
        row["note"] = (row.get("note", "") + f" {cluster.orphans} child process(es) of the nodes outlived them "
                       "(killed by this script)").strip()
    return row


def run(cluster: Cluster, size: int, row: dict) -> None:
    nodes = converge(cluster, size, row)
    at_start = sum(map(len, cluster.suspects()))  # every suspect so far was false
    quiet_window(nodes, row)
    detect(cluster, nodes, row, at_start)


def converge(cluster: Cluster, size: int, row: dict) -> list[Node]:
    """1. Convergence and join: fills ``row``'s up, join_*, conv_* and poll_ms; returns the nodes."""
    for _ in range(size - 1):
        cluster.spawn()
    cluster.wait_up(cluster.nodes)
    row["up"] = max(n.up for n in cluster.nodes) - cluster.nodes[0].spawned
    last = cluster.spawn()
    cluster.wait_up([last])
    nodes = cluster.nodes
    alive = lambda p: p is not None and p["state"] == "alive" and bool(p["name"])  # noqa: E731 (name: full record)
    t = cluster.watch(nodes, {"conv": lambda n, peers: all(alive(peers.get(m.id)) for m in nodes if m is not n),
                              "join": lambda n, peers: n is last or alive(peers.get(last.id))})
    if t["join"] is not None:
        row["join_spawn"], row["join_up"] = t["join"] - last.spawned, t["join"] - last.up
    row["poll_ms"] = cluster.sweep_s * 1000
    if t["conv"] is None:
        raise Timeout("the cluster never converged")
    row["conv_first"], row["conv_last"] = t["conv"] - nodes[0].spawned, t["conv"] - last.spawned
    return nodes


def quiet_window(nodes: list[Node], row: dict) -> None:
    """3. Gossip traffic and CPU in a quiet window (before the kill, with all N nodes)."""
    size = len(nodes)

    def sample() -> tuple[list[tuple[float, dict]], float, float, float]:
        counters = [(time.monotonic(), (n.ask("status") or {}).get("counters", {})) for n in nodes]
        return counters, time.monotonic(), tree_cpu_s([n.proc.pid for n in nodes]), host_cpu_s()
    before, t0, cpu0, host0 = sample()
    time.sleep(WINDOW_S)
    after, t1, cpu1, host1 = sample()
    for key, col in (("gossip_out_bytes", "out_bps"), ("gossip_in_bytes", "in_bps")):
        row[col] = sum((a[1].get(key, 0) - b[1].get(key, 0)) / (a[0] - b[0]) for b, a in zip(before, after)) / size
    row["cpu"], row["host_cpu"] = 100 * (cpu1 - cpu0) / (t1 - t0), 100 * (host1 - host0) / (t1 - t0)


def detect(cluster: Cluster, nodes: list[Node], row: dict, at_start: int) -> None:
    """2. Failure detection, and the false suspects until convergence (``at_start``) / after it."""
    victim = random.choice(nodes[1:])
    before_kill = cluster.suspects()  # so was every one until the kill
    cluster.note_children()
    killed = time.monotonic()
    victim.proc.kill()
    state = lambda peers: peers.get(victim.id, {"state": "dead"})["state"]  # noqa: E731 (removed counts as dead)
    t = cluster.watch([n for n in nodes if n is not victim], {"suspect": lambda n, peers: state(peers) != "alive",
                                                              "dead": lambda n, peers: state(peers) == "dead"})
    row["suspect"] = t["suspect"] and t["suspect"] - killed
    row["dead"] = t["dead"] and t["dead"] - killed
    false = sum(len(b) + sum(1 for i in a[len(b):] if i != victim.id)
                for b, a in zip(before_kill, cluster.suspects()))
    row["false_suspects"] = f"{at_start}/{false - at_start}"


def fmt(value: object) -> str:
    if value is None:
        return "timeout"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    return str(value)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---:|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(k)) for k in COLUMNS) + " |" for r in rows])


def machine() -> str:
    return common_machine(unknown_cpu="unknown CPU")


def section(rows: list[dict], command: str, role: str) -> str:
    r16 = next((r for r in rows if r["N"] == 16), {})
    met = lambda v, aim: "no figure" if v is None else "met" if v < aim else "missed"  # noqa: E731
    verdict = (f"At N = 16: converged {fmt(r16.get('conv_last'))} s after the last spawn (aim < 2 s: "
               f"{met(r16.get('conv_last'), 2)}); dead everywhere {fmt(r16.get('dead'))} s after the kill "
               f"(aim < 5 s: {met(r16.get('dead'), 5)}).") if r16 else ""
    notes = "".join(f"- N = {r['N']}: {r['note']}\n" for r in rows if r.get("note"))
    busy = [r for r in rows if r.get("host_cpu", 0) - r.get("cpu", 0) > 50]
    if busy:
        notes += ("- Other work was running: it used " + ", ".join(
            f"{r['host_cpu'] - r['cpu']:.0f}% (N = {r['N']})" for r in busy) + " of the machine in the quiet window, "
            "so the times include waiting for a core.\n")
    notes += "\n" if notes else ""
    return f"""{START}
## Membership at scale

Command (repository root): `{command}`
Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {machine()}.

N `zswarm {role}` processes on 127.0.0.1 (mDNS off), each bootstrapped to one random earlier node;
the first N-1 spawned back to back, the last once they all answer. *conv*: every node lists all
N-1 others alive with their full record. *join*: every node lists the last node alive, timed from
its spawn or from when its admin socket first answered (*up*). *suspect*/*dead*: every survivor
lists a SIGKILLed node so. Traffic and CPU: a {WINDOW_S:.0f} s quiet window after convergence; *out*
counts each message once, though PUB copies it to every peer (what leaves a node is about *in*).
CPU: 100% = one core; *nodes* counts them and their children, *host* the whole machine (nodes and
anything else running). *false suspects*: log lines of a live peer going alive -> suspect, until
convergence / after it. *poll*: the first admin sweep over all nodes (the resolution of the
times). One run per N.

{table(rows)}

{notes}LocalAI (what zswarm replaces) announces every 5-20 s with backoff, polls discovery every 5 s
and marks a node offline only after 40 s: a new node shows up after 5 s or more, a dead one after
40 s. zswarm's aims: convergence < 2 s at N = 16, detection < 5 s.
{verdict}
{END}
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sizes", default="8,16,32", help="cluster sizes, comma-separated [default: 8,16,32]")
    p.add_argument("--role", choices=("worker", "federated"), default="worker", help="the nodes' role [worker]")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds any one wait may take [60]")
    p.add_argument("--seed", type=int, help="seed for the random bootstrap and victim choices")
    p.add_argument("--write", action="store_true", help="replace this benchmark's section of docs/BENCHMARKS.md")
    args = p.parse_args()
    random.seed(args.seed)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"N = {size} ...", file=sys.stderr, flush=True)
        rows.append(measure(size, args.deadline, args.role))
        if rows[-1].get("note"):
            print(f"N = {size}: {rows[-1]['note']}", file=sys.stderr)
    print(table(rows))
    if args.write:
        replace_in_doc(START, END, section(rows, command_line(), args.role).rstrip("\n"))
        print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
