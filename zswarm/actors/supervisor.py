"""RPCSupervisor actor: starts, watches and restarts the node's child processes.

Children: the inference engine (``python -m zswarm.engine.proc``), the HTTP API (gunicorn), and
in worker mode the llama.cpp RPC server. Model code never runs in the node process: llama.cpp
aborts its whole process on some errors, and the node must outlive that.

Each child has a watcher thread that reads its output (a ``READY`` line means up) and waits for
its exit, then tells the actor. A child that dies is restarted after a back-off that doubles
from ``BACKOFF_MIN_S`` to ``BACKOFF_MAX_S`` and resets once it has stayed up ``STABLE_AFTER_S``
(circus calls a child that keeps dying "flapping"; it must not spin). Stop is graceful: SIGTERM,
then SIGKILL after ``GRACE_S``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pykka

from .listener import notify

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
GRACE_S = 5.0


@dataclass
class ChildSpec:
    name: str
    argv: list[str] | Callable[[], list[str] | None]  # a callable is asked at every (re)start;
    # None from it means "nothing to run yet": the child waits for restart_child()
    env: dict[str, str] = field(default_factory=dict)
    ready_prefix: str | None = "READY"  # None: up as soon as it is started
    on_ready: Callable[[str], None] | None = None  # called (in the actor) with the READY line's rest
    on_down: Callable[[str], None] | None = None  # called (in the actor) with why it went down
    report_prefix: str | None = None  # lines starting with this go to on_report (e.g. "LAYERS")
    on_report: Callable[[str], None] | None = None


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    state: str = "stopped"  # starting, ready, backoff, stopped
    restarts: int = 0
    backoff_s: float = BACKOFF_MIN_S
    started_at: float = 0.0
    generation: int = 0
    timer: threading.Timer | None = None
    last_exit: str = ""
    restart_now: bool = False  # asked for (restart_child): no back-off, not a crash


@dataclass
class _Ready:
    name: str
    generation: int
    detail: str


@dataclass
class _Report:
    name: str
    generation: int
    line: str


@dataclass
class _Exited:
    name: str
    generation: int
    returncode: int


@dataclass
class _Restart:
    name: str


class SupervisorActor(pykka.ThreadingActor):
    def __init__(self, stats: Any = None):
        super().__init__()
        self._children: dict[str, _Child] = {}
        self._stats = stats
        self._listeners: list[Any] = []
        self._stopping = False

    # --- API ---
    def add_listener(self, ref: Any) -> None:
        self._listeners.append(ref)

    def start_child(self, spec: ChildSpec) -> None:
        self._children[spec.name] = c = _Child(spec)
        self._spawn(c)

    def status(self) -> dict[str, Any]:
        return {name: {"state": c.state, "pid": c.proc.pid if c.proc and c.state != "backoff" else None,
                       "restarts": c.restarts, "last_exit": c.last_exit}
                for name, c in self._children.items()}

    def restart_child(self, name: str) -> bool:
        """Restart a child now (a new argv takes effect), skipping the back-off."""
        c = self._children.get(name)
        if c is None:
            return False
        if c.proc is not None and c.proc.poll() is None:
            c.restart_now = True
            c.proc.terminate()
            proc = c.proc  # a child hung in C code may ignore SIGTERM: kill it after the grace period
            killer = threading.Timer(GRACE_S, lambda: proc.poll() is None and proc.kill())
            killer.daemon = True
            killer.start()
        elif c.state in ("backoff", "waiting", "stopped"):
            if c.timer is not None:
                c.timer.cancel()
            c.backoff_s = BACKOFF_MIN_S
            self._spawn(c)
        return True

    # --- actor thread ---
    def _spawn(self, c: _Child) -> None:
        c.generation += 1
        c.state = "starting"
        env = {**os.environ, **c.spec.env, "ZSWARM_PARENT_PID": str(os.getpid())}
        argv = c.spec.argv() if callable(c.spec.argv) else c.spec.argv
        if argv is None:
            c.state = "waiting"
            log.info("%s: waiting (nothing to run yet)", c.spec.name)
            return
        try:
            c.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        except OSError as e:
            log.error("%s: cannot start: %s", c.spec.name, e)
            self._schedule_restart(c, f"cannot start: {e}")
            return
        c.started_at = time.monotonic()
        log.info("%s: started (pid %d)", c.spec.name, c.proc.pid)
        threading.Thread(target=_watch, name=f"watch-{c.spec.name}", daemon=True,
                         args=(self.actor_ref, c.spec, c.proc, c.generation)).start()
        if c.spec.ready_prefix is None:
            self._on_ready(c, "")

    def on_receive(self, message: Any) -> None:
        c = self._children.get(getattr(message, "name", ""))
        if c is None:
            return
        if isinstance(message, _Ready) and message.generation == c.generation:
            self._on_ready(c, message.detail)
        elif isinstance(message, _Report) and message.generation == c.generation and c.spec.on_report:
            c.spec.on_report(message.line)
        elif isinstance(message, _Exited) and message.generation == c.generation:
            self._on_exit(c, message.returncode)
        elif isinstance(message, _Restart) and c.state == "backoff" and not self._stopping:
            self._spawn(c)

    def _on_ready(self, c: _Child, detail: str) -> None:
        c.state = "ready"
        log.info("%s: ready %s", c.spec.name, detail)
        if c.spec.on_ready:
            c.spec.on_ready(detail)
        notify(self._listeners, "child_ready", child=c.spec.name, detail=detail)

    def _on_exit(self, c: _Child, rc: int) -> None:
        why = f"exited with status {rc}" if rc >= 0 else f"killed by {signal.Signals(-rc).name}"
        c.last_exit = why
        was_up = c.state in ("starting", "ready")
        if self._stopping:
            c.state = "stopped"
            return
        planned, c.restart_now = c.restart_now, False
        if not planned:
            log.warning("%s: %s", c.spec.name, why)
            if self._stats is not None:
                self._stats.inc(f"restarts_{c.spec.name}")
        if was_up and c.spec.on_down:
            c.spec.on_down("is restarting" if planned else why)
        notify(self._listeners, "child_down", child=c.spec.name, why=why)
        if planned:
            c.state = "stopped"
            self._spawn(c)
            return
        if time.monotonic() - c.started_at >= STABLE_AFTER_S:
            c.backoff_s = BACKOFF_MIN_S
        self._schedule_restart(c, why)

    def _schedule_restart(self, c: _Child, why: str) -> None:
        c.state = "backoff"
        c.restarts += 1
        delay = c.backoff_s
        c.backoff_s = min(BACKOFF_MAX_S, c.backoff_s * 2)
        log.info("%s: restarting in %.1f s", c.spec.name, delay)
        c.timer = threading.Timer(delay, _tell, args=(self.actor_ref, _Restart(c.spec.name)))
        c.timer.daemon = True
        c.timer.start()

    def on_stop(self) -> None:
        self._stopping = True
        live = []
        for c in self._children.values():
            if c.timer is not None:
                c.timer.cancel()
            if c.proc is not None and c.proc.poll() is None:
                try:
                    c.proc.terminate()
                    live.append(c)
                except OSError:
                    pass
        deadline = time.monotonic() + GRACE_S
        for c in live:
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s: did not stop within %s s; killing it", c.spec.name, GRACE_S)
                c.proc.kill()
                c.proc.wait(5)
            c.state = "stopped"


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the node dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _watch(ref: pykka.ActorRef, spec: ChildSpec, proc: subprocess.Popen, generation: int) -> None:
    """Runs in a watcher thread: relays the child's output to the log, and its READY and exit."""
    child_log = logging.getLogger(f"zswarm.child.{spec.name}")
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        if spec.ready_prefix and line.startswith(spec.ready_prefix):
            _tell(ref, _Ready(spec.name, generation, line[len(spec.ready_prefix):].strip()))
        elif spec.report_prefix and line.startswith(spec.report_prefix):
            _tell(ref, _Report(spec.name, generation, line[len(spec.report_prefix):].strip()))
        elif line:
            child_log.info("%s", line)
    rc = proc.wait()
    _tell(ref, _Exited(spec.name, generation, rc))


def _tell(ref: pykka.ActorRef, msg: Any) -> None:
    try:
        ref.tell(msg)
    except pykka.ActorDeadError:
        pass
