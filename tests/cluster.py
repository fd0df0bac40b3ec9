"""Test helpers that run real zswarm node processes on 127.0.0.1 (or inside a test namespace).

Every node is a child process (`python -m zswarm ROLE ...`) with mDNS off unless the test binds
it to a namespace's interface. :class:`Cluster` remembers every process it started and its
``close()`` stops them all, then fails loudly if any is still running.

Free ports (:class:`PortRange`) and :func:`wait_for` are the repository's only ones: the
benchmarks import them too (benchmarks/common.py), so this module must never import pytest or
anything a benchmark run from the repository root lacks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from zswarm.admin_client import AdminFailed, AdminUnavailable, call

REPO = Path(__file__).resolve().parent.parent


class PortRange:
    """Hands out ports P such that P..P+span-1 are all free now (a node binds its p2p port and the
    next), in sequence from a start that depends on the process id, so two processes drawing from
    one range rarely try the same ports."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high
        self._next = low + (os.getpid() * 30) % (high - low)

    def free(self, span: int = 1, host: str = "127.0.0.1") -> int:
        for _ in range((self.high - self.low) // span + 1):
            base = self._next if self._next + span <= self.high else self.low
            self._next = base + span
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
        raise RuntimeError(f"no {span} free port(s) in a row in {self.low}-{self.high - 1}")


# Below the kernel's ephemeral range (32768-60999), so a test node's port is never one the kernel
# picks for an outgoing connection; the benchmarks draw from their own range (benchmarks/common.py).
free_port = PortRange(20000, 32000).free


# What a poll may meet before the thing it waits for is up: the admin socket not there yet, a
# connection refused. Anything else is a bug in the predicate and fails at once.
NOT_YET = (AdminUnavailable, AdminFailed, OSError)


class WaitTimeout(AssertionError):
    """A :func:`wait_for` deadline passed."""


def wait_for(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.05, what: str = "", *,
             check: Callable[[], None] | None = None,
             retry: tuple[type[BaseException], ...] = NOT_YET) -> Any:
    """Poll until ``predicate()`` is truthy and return its value; an exception of ``retry`` counts
    as "not yet". ``check()`` runs before each try and may raise to give up early (the process
    waited on has died). After ``timeout_s``: :class:`WaitTimeout`, naming ``what`` and the last
    exception."""
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while True:
        if check is not None:
            check()
        try:
            value = predicate()
            if value:
                return value
        except retry as e:
            last_exc = e
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout_s} s waiting for {what or predicate}"
                              + (f" (last error: {last_exc})" if last_exc else ""))
        time.sleep(interval_s)


class NodeProc:
    def __init__(self, role: str, name: str, state_dir: Path, host: str, port: int, args: list[str],
                 log_path: Path, prefix: list[str] | None = None, env: dict[str, str] | None = None):
        self.role, self.name, self.state_dir, self.host, self.port = role, name, state_dir, host, port
        self.args, self.log_path, self.prefix, self.env = args, log_path, prefix or [], env
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "NodeProc":
        cmd = [*self.prefix, sys.executable, "-m", "zswarm", self.role, "--name", self.name,
               "--state-dir", str(self.state_dir), "--p2p-listen", self.endpoint, *self.args]
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONPATH": str(REPO), **(self.env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        return self

    def admin(self, command: str, **args: Any) -> Any:
        return call(str(self.state_dir), command, args, timeout_s=3.0)

    def peers(self) -> list[dict]:
        return self.admin("peers")

    def node_id(self) -> str:
        return wait_for(lambda: self.admin("status")["id"], 15, what=f"{self.name} to answer")

    def alive_peer_names(self) -> set[str]:
        return {p["name"] for p in self.peers() if p["state"] == "alive"}

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Cluster:
    def __init__(self, tmp: Path, token: str):
        self.tmp, self.token = tmp, token
        self.nodes: list[NodeProc] = []

    def node(self, name: str, role: str = "worker", bootstrap: list[NodeProc] | None = None,
             extra: list[str] | None = None, token: str | None = None, host: str = "127.0.0.1",
             prefix: list[str] | None = None, mdns: bool = False, port: int | None = None,
             state_dir: Path | None = None, env: dict[str, str] | None = None) -> NodeProc:
        tok = self.token if token is None else token
        args = ["--token", tok] if tok else []
        if not mdns:
            args.append("--no-mdns")
        if bootstrap:
            args += ["--bootstrap", ",".join(b.endpoint for b in bootstrap)]
        args += extra or []
        if role in ("server", "federated") and "--address" not in args:
            args += ["--address", f"{host}:{free_port(host=host) if not prefix else 8080}"]
        if port is None:  # a namespace has its own ports, all free; ours are shared with the machine
            port = 7340 if prefix else free_port(2, host)
        n = NodeProc(role, name, state_dir or self.tmp / name, host, port, args,
                     self.tmp / f"{name}.log", prefix, env)
        self.nodes.append(n)
        return n.start()

    def close(self) -> None:
        for n in self.nodes:
            if n.running():
                n.signal(signal.SIGTERM)
        leaked = []
        for n in self.nodes:
            if n.proc is None:
                continue
            try:
                n.proc.wait(10)
            except subprocess.TimeoutExpired:
                leaked.append(n.name)
                n.proc.kill()
                n.proc.wait(5)
        assert not leaked, f"nodes did not stop on SIGTERM within 10 s: {leaked}"


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, their children...), from /proc/*/stat's ppid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


# --- worker mode: what a server's status says of its split ---

def shard(server: NodeProc) -> dict:
    return server.admin("status").get("shard") or {}


def child_state(status: dict, name: str) -> str:
    """The state of a node's child ``name`` in its admin ``status`` ("" while it is not listed: a
    child joins the status once the node has started it, a moment after the admin socket answers)."""
    return ((status.get("children") or {}).get(name) or {}).get("state", "")


def split_is(server: NodeProc, names: list[str]) -> bool:
    """Is ``server``'s engine up on a split over exactly the workers ``names``?"""
    s = shard(server)
    return (child_state(server.admin("status"), "engine") == "ready" and not s.get("pending")
            and sorted(w["name"] for w in s.get("workers", [])) == sorted(names) and s.get("n_layers", 0) > 0)


def rpc_child(worker: NodeProc) -> int | None:
    """The pid of a worker's llama.cpp RPC server process (None: not started yet)."""
    return next((p for p in descendants(worker.proc.pid)
                 if "zswarm.engine.rpc_server" in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")), None)
