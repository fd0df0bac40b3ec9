"""RPCSupervisor actor: starts, watches and restarts the node's child processes.

Children: the inference engine (``python -m zswarm.engine.proc``), the HTTP API (gunicorn), and
in worker mode the llama.cpp RPC server. Model code never runs in the node process: llama.cpp
aborts its whole process on some errors, and the node must outlive that.

Each child has a watcher thread that reads its output (a ``READY`` line means up) and waits for
its exit, then tells the actor. A child that dies is restarted after a back-off that doubles
from ``BACKOFF_MIN_S`` to ``BACKOFF_MAX_S`` and resets once it has stayed up ``STABLE_AFTER_S``
(circus calls a child that keeps dying "flapping"; it must not spin). A restart asked for is
SIGTERM, then SIGKILL after ``GRACE_S``; the node's stop gives its children ``STOP_GRACE_S``.

A child that dies *before* it was ever ready is a different matter: a build for another CPU, a
model file llama.cpp aborts on, a port in use. Restarting cannot fix it, so the first such death
is reported once, clearly and with the remedy (:func:`explain`; the child's ``FAULT`` line from
:mod:`zswarm.engine.fault` names the library that faulted, its ``STAGE`` lines say what it was
doing), and after ``GIVE_UP_AFTER`` identical deaths by a fault of its own (SIGILL, SIGSEGV,
SIGBUS, SIGFPE; not one another process sent) in a row the child is left ``failed``; other early
deaths keep the back-off restarts. A failed child makes the
node say why in its log, ``zswarm admin status``, ``/readyz`` and the API's 503 body
(``on_failed``). ``restart_child`` (a new plan, an operator) tries again.

At start-up it is fatal: a child that was never ready and exits with ``EX_CONFIG`` (a mistake
it named in its last line: no model file, an address in use), or that reaches ``GIVE_UP_AFTER``
above, makes the whole node stop and exit non-zero with that one line (``on_fatal``), so that
systemd and the user learn that it failed. Once a child has been ready, its later deaths are
restarted (or end ``failed``) as above, and the node stays up.

Liveness: an exit code says nothing about a child that is stopped (SIGSTOP), frozen in a system
call, or stuck in llama.cpp waiting on a worker that never answers. A child whose spec says
``beats`` writes a ``BEAT`` line about every ``BEAT_S`` (engine/child.py); its watcher thread
notes it in a :class:`~.liveness.Pulse`, and a timer the actor re-arms asks it every ``CHECK_S`` to
judge (the watcher cannot: it is blocked reading a stopped child). A child that
:func:`~.liveness.verdict` finds hung (no beat for ``hang_s``; or ready, holding requests, its
progress count standing for ``stuck_s``) is SIGKILLed with its process group and restarted like
a crash; ``on_down`` is called at once, so the requests it held end or retry elsewhere at once.
A child loading a model keeps beating (the beat has a thread of its own, and model code releases
the GIL), so a slow load is never taken for a hang.

A child inherits the node's environment less every variable that can carry the cluster token
or an API key (:func:`inherited_env`): it must never hold them, and none of its arguments do.

The ``on_*`` callbacks of a :class:`ChildSpec` are the node's code: one that raises is logged
and counted, and the child's supervision goes on (its restart must still happen). When the
supervisor itself dies, its ``release`` stops every child rather than leave them running
unsupervised, and the node, which cannot serve without them, stops (``node.py``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pykka

from ..config import SECRET_ENVS
from ..engine import fault
from ..engine.child import BEAT_ENV, EX_CONFIG
from .base import GuardedActor, Watch
from .listener import tell, tell_later
from .liveness import Pulse, verdict

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
GRACE_S = 5.0  # restart_child: SIGTERM, then SIGKILL after this (a child may finish a request)
STOP_GRACE_S = 0.5  # on_stop: the node must be gone within 2 s of SIGTERM (node.STOP_BUDGET_S)
RESTARTING = "is restarting"  # what on_down hears for a planned restart (restart_child)
GIVE_UP_AFTER = 3  # identical deaths before ready, in a row, after which restarting stops
BEAT_S = 1.0  # how often a beating child beats (it costs a line of a few bytes per second)
CHECK_S = 1.0  # how often the actor looks at the beats
# The defaults of hang_s and stuck_s, and why, are config.py's (--child-hang, --child-stuck).
HANG_S = 10.0
STUCK_S = 120.0
# Deaths before ready that a restart cannot fix are faults (fault.SIGNALS): the build or the
# machine. SIGABRT is not one: llama.cpp aborts when an RPC worker vanishes mid-load, and the next
# plan fixes that.


@dataclass
class ChildSpec:
    name: str
    argv: list[str] | Callable[[], list[str] | None]  # a callable is asked at every (re)start;
    # None from it means "nothing to run yet": the child waits for restart_child()
    env: dict[str, str] = field(default_factory=dict)
    ready_prefix: str | None = "READY"  # None: up as soon as it is started
    on_ready: Callable[[str], None] | None = None  # called (in the actor) with the READY line's rest
    on_down: Callable[[str], None] | None = None  # called (in the actor) with why it went down
    # lines starting with one of these go to on_report, whole (e.g. "LAYERS {...}")
    report_prefix: tuple[str, ...] = ()
    on_report: Callable[[str], None] | None = None
    on_failed: Callable[[str], None] | None = None  # called (in the actor) when restarting stops
    # called (in the actor) with one line when the child can never start (never ready, and
    # EX_CONFIG or GIVE_UP_AFTER faults): the node stops and exits non-zero with that line
    on_fatal: Callable[[str], None] | None = None
    beats: bool = False  # it writes BEAT lines (engine/child.py); killed when they stop
    pass_fds: tuple[int, ...] = ()  # descriptors it inherits, e.g. the HTTP listening socket
    # lines starting with one of these are logged at DEBUG: routine, and many (llama.cpp's RPC
    # server says so for each connection: a probe, then the server's, every load)
    chatter: tuple[str, ...] = ()


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    state: str = "stopped"  # starting, ready, backoff, waiting (no argv yet), failed, stopped
    restarts: int = 0
    backoff_s: float = BACKOFF_MIN_S
    started_at: float = 0.0
    generation: int = 0
    timer: threading.Timer | None = None
    last_exit: str = ""
    restart_now: bool = False  # asked for (restart_child): no back-off, not a crash
    stage: str = ""  # what the child said it was doing (its last STAGE line)
    fault: dict | None = None  # its FAULT report, if it wrote one before dying
    early: tuple[str, int] = ("", 0)  # (why, how many times in a row) it died before ready
    problem: str = ""  # why it is failed, or why it last died before ready
    ever_ready: bool = False  # has any generation been ready? (a later failure is not fatal)
    pulse: Pulse | None = None  # this generation's beats, written by its watcher thread
    hung: str = ""  # why this generation was killed as hung ("" if it was not)
    down_told: bool = False  # on_down was already called for this generation (at the kill)
    hangs: int = 0
    last_restart: str = ""  # why it was last restarted: "crashed", "hung" or "planned"


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
    kind: str = "report"  # "report" (the spec's report_prefix), "stage" or "fault"


@dataclass
class _Exited:
    name: str
    generation: int
    returncode: int
    last_words: str = ""  # its last error line, else its last line of output


@dataclass
class _Restart:
    name: str


class _Tick:
    pass


class SupervisorActor(GuardedActor):
    name = "supervisor"

    def __init__(self, stats: Any = None, hang_s: float = HANG_S, stuck_s: float = STUCK_S,
                 watch: Watch | None = None):
        super().__init__(watch)
        self._children: dict[str, _Child] = {}
        self._stats = stats
        self._stopping = False
        self._hang_s = hang_s  # 0: never judge missing beats
        self._stuck_s = stuck_s  # 0: never judge a standing progress count
        self._tick: threading.Timer | None = None  # the next _Tick (liveness checks on)
        now = time.monotonic()
        self._last_check = now
        self._judge_from = now  # beats older than this are not held against a child (see _check)

    def on_start(self) -> None:
        """Actor thread: start the ticks that make the actor look at the beats."""
        if self._hang_s or self._stuck_s:
            self._tick = tell_later(self.actor_ref, _Tick(), CHECK_S)

    # --- API ---
    def start_child(self, spec: ChildSpec) -> None:
        self._children[spec.name] = c = _Child(spec)
        self._spawn(c)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        out = {}
        for name, c in self._children.items():
            out[name] = {"state": c.state, "pid": c.proc.pid if c.proc and c.state not in ("backoff", "failed")
                         else None, "restarts": c.restarts, "last_exit": c.last_exit, "problem": c.problem,
                         "stage": c.stage if c.state == "starting" else "", "last_restart": c.last_restart}
            if c.spec.beats:
                beat_at, _, in_flight, count = c.pulse.last if c.pulse else (0.0, 0.0, 0, None)
                out[name]["heartbeat"] = {"age_s": round(now - beat_at, 1) if beat_at else None,
                                          "progress": count, "in_flight": in_flight, "hangs": c.hangs}
        return out

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
        elif c.state in ("backoff", "waiting", "stopped", "failed"):
            if c.timer is not None:
                c.timer.cancel()
            c.backoff_s = BACKOFF_MIN_S
            if c.state == "failed":
                self._call(c, "on_failed", "")  # trying again: requests may wait for it once more
            self._spawn(c)
        c.early, c.problem = ("", 0), ""  # a new attempt (a new plan): nothing to count it against
        return True

    # --- actor thread ---
    def _spawn(self, c: _Child) -> None:
        c.generation += 1
        c.state = "starting"
        c.stage, c.fault, c.hung, c.down_told = "", None, "", False
        env = {**inherited_env(), **c.spec.env, "ZSWARM_PARENT_PID": str(os.getpid())}
        if c.spec.beats:
            env[BEAT_ENV] = str(BEAT_S)
        argv = c.spec.argv() if callable(c.spec.argv) else c.spec.argv
        if argv is None:
            c.state = "waiting"
            log.info("%s: waiting (nothing to run yet)", c.spec.name)
            return
        try:
            # No preexec_fn: this process is threaded, and code between fork and exec can
            # deadlock the child; each child asks for its parent-death signal itself.
            c.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      pass_fds=c.spec.pass_fds)
        except OSError as e:
            log.error("%s: cannot start: %s", c.spec.name, e)
            self._schedule_restart(c, f"cannot start: {e}")
            return
        c.started_at = time.monotonic()
        c.pulse = Pulse(c.started_at)
        log.info("%s: started (pid %d)", c.spec.name, c.proc.pid)
        threading.Thread(target=_watch, name=f"watch-{c.spec.name}", daemon=True,
                         args=(self.actor_ref, c.spec, c.proc, c.generation, c.pulse)).start()
        if c.spec.ready_prefix is None:
            self._on_ready(c, "")

    def handle(self, message: Any) -> None:
        if isinstance(message, _Tick):
            try:
                self._check()
            finally:  # the next look, whatever this one did (a released actor asks for none)
                if self._tick is not None:
                    self._tick = tell_later(self.actor_ref, _Tick(), CHECK_S)
            return
        c = self._children.get(getattr(message, "name", ""))
        if c is None:
            return
        if isinstance(message, _Ready) and message.generation == c.generation:
            self._on_ready(c, message.detail)
        elif isinstance(message, _Report) and message.generation == c.generation:
            self._on_line(c, message)
        elif isinstance(message, _Exited) and message.generation == c.generation:
            self._on_exit(c, message.returncode, message.last_words)
        elif isinstance(message, _Restart) and c.state == "backoff" and not self._stopping:
            self._spawn(c)

    def _on_line(self, c: _Child, m: _Report) -> None:
        if m.kind == "stage":
            c.stage = m.line
        elif m.kind == "fault":
            c.fault = fault.parse(m.line)
        elif m.kind == "report":
            self._call(c, "on_report", m.line)

    def _call(self, c: _Child, hook: str, *args: Any) -> None:
        """Call the spec's ``hook`` (the node's code): if it raises, it is logged with its
        traceback and counted, and the supervision of ``c`` goes on where it was."""
        fn = getattr(c.spec, hook)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            self.failed(f"{c.spec.name}'s {hook} callback")

    # --- liveness (actor thread) ---
    def _check(self) -> None:
        now = time.monotonic()
        gap, self._last_check = now - self._last_check, now
        if gap > max(2 * CHECK_S, self._hang_s / 2):
            # This process itself did not run (SIGSTOP, a paused VM, a starved machine): the
            # beats of that time may still sit unread in the pipes. Judge from now on.
            log.info("the supervisor did not run for %.1f s; heartbeats are judged from now", gap)
            self._judge_from = now
            return
        if self._stopping:
            return
        for c in self._children.values():
            if c.spec.beats and c.state in ("starting", "ready") and c.pulse is not None and not c.hung:
                why = verdict(c.pulse, c.started_at, self._judge_from, now, self._hang_s, self._stuck_s,
                              c.state == "ready")
                if why:
                    self._kill_hung(c, why)

    def _kill_hung(self, c: _Child, why: str) -> None:
        """SIGKILL a hung child's process group; it is restarted when its exit is seen, like a
        crash, but those who route to it hear now that it is down."""
        c.hung, c.hangs = why, c.hangs + 1
        log.error("%s %s; killing it", c.spec.name, why)
        if self._stats is not None:
            self._stats.inc(f"hangs_{c.spec.name}")
        try:
            os.killpg(c.proc.pid, signal.SIGKILL)  # its own session (start_new_session)
        except OSError:
            try:
                c.proc.kill()
            except OSError:
                pass
        if c.state == "ready" and c.spec.on_down:
            c.down_told = True
            self._call(c, "on_down", f"hung ({why})")

    def _on_ready(self, c: _Child, detail: str) -> None:
        c.state = "ready"
        c.ever_ready = True
        c.early, c.problem = ("", 0), ""
        log.info("%s: ready %s", c.spec.name, detail)
        self._call(c, "on_ready", detail)

    def _on_exit(self, c: _Child, rc: int, last_words: str = "") -> None:
        why = f"exited with status {rc}" if rc >= 0 else f"killed by {_signame(-rc)}"
        hung, told = c.hung, c.down_told
        if hung:
            why = f"hung ({hung}); killed"
        c.last_exit = why
        was_up = c.state in ("starting", "ready")
        was_ready = c.state == "ready"
        if self._stopping:
            c.state = "stopped"
            return
        planned, c.restart_now = c.restart_now, False
        c.last_restart = "planned" if planned else "hung" if hung else "crashed"
        # A hang is not an early death to count or explain: the kill was ours, and said why.
        early = not planned and not hung and not was_ready and c.spec.ready_prefix is not None
        if early and self._died_early(c, rc, why, last_words):
            return
        if not planned:
            if not early and not hung:  # _died_early and _kill_hung said it already
                log.warning("%s: %s", c.spec.name, why)
            if self._stats is not None:
                self._stats.inc(f"restarts_{c.spec.name}")
        if was_up and not told:
            self._call(c, "on_down", RESTARTING if planned else why)
        if planned:
            c.state = "stopped"
            self._spawn(c)
            return
        if time.monotonic() - c.started_at >= STABLE_AFTER_S:
            c.backoff_s = BACKOFF_MIN_S
        self._schedule_restart(c, why)

    def _died_early(self, c: _Child, rc: int, why: str, last_words: str) -> bool:
        """A death before ready: report the first clearly, give up after a few. True: gave up.

        Giving up on a child that was never ready is fatal to the node (``on_fatal``), and so
        is its first EX_CONFIG exit: the node cannot do its job, and must say so by exiting."""
        same = c.early[0] == why
        c.early = (why, c.early[1] + 1 if same else 1)
        c.problem = explain(c.spec.name, rc, c.stage, c.fault, last_words)
        if rc == EX_CONFIG and not c.ever_ready:
            if last_words:  # the child's own line names the mistake; the exit status adds nothing
                c.problem = f"the {_title(c.spec.name)} cannot start: {last_words}"
            log.error("%s", c.problem)
            return self._give_up(c, fatal=True)
        if c.early[1] == 1:
            log.error("%s", c.problem)
        else:
            log.warning("%s: %s again before it was ready (%d in a row)", c.spec.name, why, c.early[1])
        own_fault = rc < 0 and -rc in fault.SIGNALS and not (c.fault and "sender_pid" in c.fault)
        if c.early[1] < GIVE_UP_AFTER or not own_fault:
            return False
        c.problem = f"{c.problem} (gave up after {c.early[1]} identical failures before ready)"
        log.error("%s: not restarting it: it died %d times in a row the same way before it was ready",
                  c.spec.name, c.early[1])
        return self._give_up(c, fatal=not c.ever_ready)

    def _give_up(self, c: _Child, fatal: bool) -> bool:
        """Leave ``c`` failed; if ``fatal``, the node is told to exit too."""
        c.state = "failed"
        if self._stats is not None:
            self._stats.inc(f"failed_{c.spec.name}")
        self._call(c, "on_failed", c.problem)
        if fatal:
            self._call(c, "on_fatal", c.problem)
        return True

    def _schedule_restart(self, c: _Child, why: str) -> None:
        c.state = "backoff"
        c.restarts += 1
        delay = c.backoff_s
        c.backoff_s = min(BACKOFF_MAX_S, c.backoff_s * 2)
        log.info("%s: restarting in %.1f s", c.spec.name, delay)
        c.timer = tell_later(self.actor_ref, _Restart(c.spec.name), delay)

    def release(self) -> None:
        """On a stop and on a death alike: the children go too, rather than run on unsupervised."""
        tick, self._tick = self._tick, None
        if tick is not None:
            tick.cancel()
        self._stop_children()

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        log.error("the supervisor failed (%s); stopping its children", exception_value)
        super().on_failure(exception_type, exception_value, traceback)

    def _stop_children(self) -> None:
        """SIGTERM every child, SIGKILL its whole session after STOP_GRACE_S (gunicorn's workers too)."""
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
        deadline = time.monotonic() + STOP_GRACE_S
        for c in live:
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s: did not stop within %s s; killing it", c.spec.name, STOP_GRACE_S)
                try:
                    os.killpg(c.proc.pid, signal.SIGKILL)  # its own session (start_new_session)
                except OSError:
                    c.proc.kill()
                try:
                    c.proc.wait(0.15)
                except subprocess.TimeoutExpired:
                    pass  # the node's last resort (node._kill_children) comes next
            c.state = "stopped"


_WHAT = {"loading": "while loading the model", "proving": "during its test computation"}
_TITLES = {"rpc": "RPC server", "http": "HTTP server"}


def _title(name: str) -> str:
    return _TITLES.get(name, name)


def explain(name: str, rc: int, stage: str, report: dict | None, last_words: str) -> str:
    """One line saying why child ``name`` died before it was ready, with the remedy."""
    from ..install import rebuild_command

    doing = f" {_WHAT.get(stage, 'while ' + stage)}" if stage else ""
    title = _title(name)
    if rc >= 0:
        said = f": {last_words}" if last_words else ""
        return f"the {title} exited with status {rc} before it was ready{doing}{said}"
    sig = _signame(-rc)
    where = f" ({fault.describe(report)})" if report else ""
    head = f"the {title} was killed by {sig} before it was ready{doing}{where}"
    if report and "sender_pid" in report:
        return f"{head}: another process stopped it; it is restarted"
    if sig == "SIGILL":
        return (f"{head}: llama.cpp uses CPU instructions this machine cannot execute (built for "
                f"another CPU, or for a feature this CPU advertises but cannot run); rebuild it "
                f"here: {rebuild_command()}")
    if sig in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGABRT"):
        return f"{head}: llama.cpp crashed; `zswarm doctor` checks the build and the model"
    return head


def inherited_env() -> dict[str, str]:
    """The node's environment less every variable that can carry the token or an API key
    (config.SECRET_ENVS): a child never needs them, and a bug in llama.cpp's RPC server must not
    hand them over. What a child does need, the node gives it in its spec's ``env``."""
    return {k: v for k, v in os.environ.items() if k not in SECRET_ENVS}


def _watch(ref: pykka.ActorRef, spec: ChildSpec, proc: subprocess.Popen, generation: int,
           pulse: Pulse) -> None:
    """Runs in a watcher thread: relays the child's output to the log, and its READY, STAGE,
    FAULT and report lines and its exit (with its last words) to the actor. Ordinary log lines
    and beats cost the actor nothing: the last line is kept here and sent with the exit, and a
    beat only updates ``pulse``."""
    child_log = logging.getLogger(f"zswarm.child.{spec.name}")
    assert proc.stdout is not None
    last_words, last_error = "", False
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        if line.startswith("BEAT") and spec.beats:
            pulse.beat(line[len("BEAT"):], time.monotonic())
        elif spec.ready_prefix and line.startswith(spec.ready_prefix):
            tell(ref, _Ready(spec.name, generation, line[len(spec.ready_prefix):].strip()))
        elif spec.report_prefix and line.startswith(spec.report_prefix):
            tell(ref, _Report(spec.name, generation, line))
        elif line.startswith("STAGE "):
            tell(ref, _Report(spec.name, generation, line[len("STAGE "):].strip(), "stage"))
        elif line.startswith("FAULT "):
            child_log.error("%s", line)
            tell(ref, _Report(spec.name, generation, line, "fault"))
        elif line and spec.chatter and line.startswith(spec.chatter):
            child_log.debug("%s", line)
        elif line:
            child_log.info("%s", line)
            level, words = _words(line)
            if level in ("ERROR", "CRITICAL"):
                last_words, last_error = words, True
            elif not last_error:
                last_words = words
    rc = proc.wait()
    tell(ref, _Exited(spec.name, generation, rc, last_words))


_CHILD_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [\w.-]+\[\d+\] ([A-Z]+) (.*)$")


def _words(line: str) -> tuple[str, str]:
    """(level, text) of a child's log line ("date time child[pid] LEVEL text"); level "" if not one."""
    m = _CHILD_LOG.match(line)
    if m:
        return m.group(1), m.group(2).strip()[:300]
    return "", line.strip()[:300]


def _signame(signum: int) -> str:
    """SIGKILL for 9; a number Python has no name for (a real-time signal) must not raise here."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
