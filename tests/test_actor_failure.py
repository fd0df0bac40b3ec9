"""Every actor's failure policy, with an exception injected into its work (actors/base.py, node.py).

- A failed message (a tell whose handler raises, an ask inside it that timed out) is logged with
  its traceback and counted (``actor_errors_<name>``), and the actor goes on.
- A death (a BaseException in a handler, an exception in on_start) is noticed by the node: a line
  in its log, an entry in ``zswarm admin status``, and the node's reaction: the Balancer is
  restarted; any other actor stops the node with one line and exit status 1, its threads and
  sockets released first.

The node runs in this process (real sockets on 127.0.0.1, mDNS off), driven by node.py's own
loop (``_serve``) in a helper thread, so that a test can reach its actors and their classes.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import pykka
import pytest

from cluster import wait_for
from zswarm import node as node_mod
from zswarm.actors.admin import AdminActor
from zswarm.actors.balancer import BalancerActor
from zswarm.actors.base import GuardedActor, Watch
from zswarm.actors.discovery import DiscoveryActor, _Found
from zswarm.actors.gateway import GatewayActor
from zswarm.actors.ledger import LedgerActor
from zswarm.actors.listener import notify
from zswarm.actors.sharder import PlanBox, SharderActor
from zswarm.actors.supervisor import ChildSpec, SupervisorActor
from zswarm.admin_client import AdminFailed, AdminUnavailable, call
from zswarm.sharding import MIB, Device
from zswarm.token import Token

# A child that says READY and then waits to be stopped.
READY_CHILD = [sys.executable, "-c", "import time; print('READY', flush=True); time.sleep(60)"]


class Poison:
    """A message whose handler (patched in by a test) raises."""


class InProcessNode:
    """A federated node (Ledger, Gateway, Balancer, RPCSupervisor, Discovery, Admin; no children)
    run by node.py's ``_serve`` in a helper thread, as ``run()`` runs it in the main thread."""

    def __init__(self, tmp_path):
        self.settings = node_mod.NodeSettings(
            role="federated", token=Token.generate(), state_dir=str(tmp_path / "node"),
            p2p_listen="127.0.0.1:0", mdns=False, local_only=True, name="inproc")
        self.node = node_mod.Node(self.settings)
        self.stopping: list[int] = []
        self.result: tuple[int, str | None] | None = None
        self._thread = threading.Thread(target=self._serve, name="test-serve", daemon=True)
        self._thread.start()
        wait_for(lambda: not self.node._starting and self.status(), 10, what="the node to start")

    def _serve(self) -> None:
        self.result = node_mod._serve(self.node, self.settings, None, self.stopping)

    def status(self) -> dict:
        return call(self.settings.state_dir, "status", timeout_s=3)

    def counter(self, name: str) -> int:
        return self.node.stats.snapshot().get(name, 0)

    def ref(self, cls: type) -> pykka.ActorRef:
        return next(r for r in self.node.actors if r.actor_class is cls)

    def ended(self, timeout_s: float = 5) -> tuple[int, str | None]:
        """What ``_serve`` returned: it stopped watching because the node must stop."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the node did not react to the death"
        return self.result

    def close(self) -> None:
        self.stopping.append(signal.SIGTERM)
        self._thread.join(5)
        clean = self.node.stop()
        self.node.state.release()
        assert clean, "the node did not stop cleanly (see the log)"
        assert not pykka.ActorRegistry.get_all()


@pytest.fixture
def node(tmp_path):
    n = InProcessNode(tmp_path)
    try:
        yield n
    finally:
        n.close()


def io_thread_alive(name: str) -> bool:
    return any(t.name == name and t.is_alive() for t in threading.enumerate())


# --- a failed message: logged, counted, and the actor lives on ---

def fail_ledger(n, monkeypatch):
    """The Ledger's tick (every heartbeat, from its io thread) raises."""
    monkeypatch.setattr(LedgerActor, "_tick", _raise(RuntimeError("injected")))


def fail_balancer(n, monkeypatch):
    """The Balancer's ask of the Ledger times out while it rebuilds the routes."""
    monkeypatch.setattr(BalancerActor, "_rebuild", _raise(pykka.Timeout("injected")))
    notify([n.node.balancer], "ledger_changed")


def fail_discovery(n, monkeypatch):
    """A malformed find (an unhashable node id) reaches Discovery."""
    n.ref(DiscoveryActor).tell(_Found(["not", "an", "id"], "tcp://127.0.0.1:1"))


def fail_admin(n, monkeypatch):
    """An admin command raises (through the real admin socket): error 3 for the caller."""
    n.ref(AdminActor).proxy().register("boom", _raise(RuntimeError("injected"))).get(timeout=5)
    with pytest.raises(AdminFailed, match="error 3"):
        call(n.settings.state_dir, "boom", timeout_s=3)


def fail_gateway(n, monkeypatch):
    """A tell to the Gateway whose handler raises."""
    monkeypatch.setattr(GatewayActor, "handle", _raise(RuntimeError("injected")))
    n.ref(GatewayActor).tell(Poison())


def fail_supervisor(n, monkeypatch):
    """A child's on_ready callback (the node's code) raises: the child is still supervised."""
    spec = ChildSpec("test", READY_CHILD, on_ready=_raise(RuntimeError("injected")))
    n.ref(SupervisorActor).proxy().start_child(spec).get(timeout=5)
    wait_for(lambda: n.status()["children"]["test"]["state"] == "ready", 10, what="the child to be ready")


@pytest.mark.parametrize("inject", [fail_ledger, fail_balancer, fail_discovery, fail_admin, fail_gateway,
                                    fail_supervisor], ids=lambda f: f.__name__[len("fail_"):])
def test_a_failed_message_is_logged_and_counted_and_the_actor_lives_on(node, inject, monkeypatch, caplog):
    name = inject.__name__[len("fail_"):]
    with caplog.at_level(logging.ERROR, logger="zswarm"):
        inject(node, monkeypatch)
        wait_for(lambda: node.counter(f"actor_errors_{name}") >= 1, 5, what=f"actor_errors_{name}")
    monkeypatch.undo()
    lines = [r for r in caplog.records if r.name == "zswarm.actors.base" and r.getMessage().startswith(name)]
    assert lines and lines[0].exc_info is not None, "logged with its traceback"
    status = node.status()  # asks the Ledger, Discovery, Gateway and RPCSupervisor too
    assert status["actors"][name] == "running" and status["failed_actors"] == []
    assert status["counters"][f"actor_errors_{name}"] >= 1
    assert all(r.is_alive() for r in node.node.actors)
    assert node.result is None  # the node carries on


# --- a death: the node says so and restarts the actor or stops ---

def kill_ledger(n, monkeypatch):
    monkeypatch.setattr(LedgerActor, "_tick", _raise(SystemExit("injected")))


def kill_gateway(n, monkeypatch):
    monkeypatch.setattr(GatewayActor, "handle", _raise(SystemExit("injected")))
    n.ref(GatewayActor).tell(Poison())


def kill_discovery(n, monkeypatch):
    monkeypatch.setattr(DiscoveryActor, "handle", _raise(SystemExit("injected")))
    n.ref(DiscoveryActor).tell(Poison())


def kill_supervisor(n, monkeypatch):
    """A child's on_ready raises a BaseException, which the supervisor's callback guard lets
    through: the supervisor dies, and its child must not run on unsupervised."""
    spec = ChildSpec("test", READY_CHILD, on_ready=_raise(SystemExit("injected")))
    n.ref(SupervisorActor).proxy().start_child(spec).get(timeout=5)


def kill_admin(n, monkeypatch):
    n.ref(AdminActor).proxy().register("die", _raise(SystemExit("injected"))).get(timeout=5)
    with pytest.raises(AdminUnavailable):
        call(n.settings.state_dir, "die", timeout_s=1)


IO_THREADS = {"ledger": "ledger-io", "gateway": "gateway-io", "admin": "admin-io"}


@pytest.mark.parametrize("kill", [kill_ledger, kill_gateway, kill_discovery, kill_supervisor, kill_admin],
                         ids=lambda f: f.__name__[len("kill_"):])
def test_a_dead_actor_stops_the_node_with_one_line_and_status_1(node, kill, monkeypatch, caplog):
    name = kill.__name__[len("kill_"):]
    children = node_mod._child_pids
    with caplog.at_level(logging.ERROR, logger="zswarm"):
        kill(node, monkeypatch)
        status, line = node.ended()
    assert (status, line) == (1, f"the {name} actor failed: SystemExit: injected")
    said = [r.getMessage() for r in caplog.records if r.name == "zswarm.node"]
    assert any(m.startswith(f"the {name} actor failed") and "stops" in m for m in said), said
    # released in its on_failure, before the node stops: no socket thread polls on, no child runs on
    assert not io_thread_alive(IO_THREADS.get(name, "-")), "its io thread still runs"
    assert not children(), "a child runs on unsupervised"
    entry = node.node.watch.status()
    assert entry["actors"][name] == "failed"
    assert entry["failed_actors"][-1]["actor"] == name and entry["failed_actors"][-1]["action"] == "stopped the node"
    if name != "admin":  # ... and the operator sees it, while the node stops
        shown = node.status()
        assert shown["failed_actors"][-1]["actor"] == name and shown["actors"][name] == "failed"
        assert shown["counters"][f"actor_failures_{name}"] == 1


def test_a_base_exception_in_a_call_stops_every_actor_and_the_node_names_the_one(node, monkeypatch, caplog):
    """pykka's rule for a BaseException raised by a proxy call: every actor stops, from that
    actor's thread. The node names the actor it came from, not the first it finds stopped."""
    monkeypatch.setattr(GatewayActor, "engine_failed", _raise(SystemExit("in a call")))
    with caplog.at_level(logging.ERROR, logger="zswarm"):
        node.ref(GatewayActor).proxy().engine_failed("x")
        status, line = node.ended()
    assert (status, line) == (1, "the gateway actor failed: SystemExit: in a call")
    # pykka stops the other actors from their own threads, while the node already sees the death:
    # the ledger's on_stop sends its Leave and lets it flush (LEAVE_LINGER_MS) before its io
    # thread ends, so that thread may outlive the node's verdict by a moment
    wait_for(lambda: not io_thread_alive("gateway-io") and not io_thread_alive("ledger-io"), 2,
             what="the io threads to end")


def test_a_dead_balancer_is_replaced_and_routes_again_until_it_keeps_dying(node, monkeypatch, caplog):
    old = node.node.balancer
    monkeypatch.setattr(BalancerActor, "on_engine_up", _raise(SystemExit("injected")))
    with caplog.at_level(logging.ERROR, logger="zswarm"):
        notify([old], "engine_up", model="m")
        wait_for(lambda: node.node.balancer is not old and node.node.balancer.is_alive(), 5, what="a new balancer")
    assert any(r.getMessage().startswith("the balancer actor failed") and "starting a new one" in r.getMessage()
               for r in caplog.records)
    status = node.status()
    assert status["actors"]["balancer"] == "running"
    assert status["failed_actors"] == [{**status["failed_actors"][0], "actor": "balancer", "action": "restarted"}]
    assert status["counters"]["actor_restarts_balancer"] == 1 and node.result is None

    # the new one does the work: the local engine becomes a route
    monkeypatch.undo()
    notify([node.node.balancer], "engine_up", model="m")
    gateway = node.ref(GatewayActor).proxy()
    wait_for(lambda: [r["models"] for r in gateway.status().get(timeout=5)["routes"]] == [["m"]], 5,
             what="the new balancer's routes")

    # an actor that keeps dying is not restarted in a tight loop: the node stops
    monkeypatch.setattr(node_mod, "RESTARTS_MAX", 1)
    monkeypatch.setattr(BalancerActor, "on_engine_up", _raise(SystemExit("injected again")))
    notify([node.node.balancer], "engine_up", model="m")
    status, line = node.ended()
    assert status == 1 and line.startswith("the balancer actor failed") and "2 times within 60 s" in line


def test_an_actor_that_dies_in_on_start_ends_the_start_up_with_one_line(tmp_path, monkeypatch):
    """pykka calls no on_failure for an exception in on_start: the node's own look at its
    actors, or the start-up's next ask of that actor, notices."""
    monkeypatch.setattr(DiscoveryActor, "on_start", _raise(RuntimeError("injected")))
    settings = node_mod.NodeSettings(role="federated", token=Token.generate(), state_dir=str(tmp_path / "n"),
                                     p2p_listen="127.0.0.1:0", mdns=False, local_only=True)
    n = node_mod.Node(settings)
    try:
        status, line = node_mod._serve(n, settings, None, [])
    finally:
        assert n.stop()
        n.state.release()
    assert status == 1 and ("the discovery actor failed" in line or "stopped while starting" in line), line


def test_run_exits_1_with_one_line_when_the_ledger_dies(tmp_path, monkeypatch, capsys):
    """The whole of node.run(): the exit status systemd sees, and the last line on stderr."""
    ticks = []

    def tick(self):
        ticks.append(1)
        if len(ticks) >= 3:  # once the node is up
            raise SystemExit("injected")
    monkeypatch.setattr(LedgerActor, "_tick", tick)
    monkeypatch.setattr(node_mod.os, "_exit", _raise(AssertionError("the node did not stop cleanly")))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    settings = node_mod.NodeSettings(role="federated", token=Token.generate(), state_dir=str(tmp_path / "n"),
                                     p2p_listen="127.0.0.1:0", mdns=False, local_only=True)
    try:
        t0 = time.monotonic()
        assert node_mod.run(settings) == 1
        assert time.monotonic() - t0 < 10
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "zswarm: error: the ledger actor failed: SystemExit: injected", err


# --- the Sharder (worker mode on a server), with the other actors faked ---

class Done:
    def __init__(self, value=None):
        self.value = value

    def get(self, timeout=None):
        return self.value


class FlakyLedger:
    """Its first ``failures`` looks fail (``error``), then it has one free worker."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error = failures, error
        self.worker = {"id": "w" * 16, "name": "w1", "role": "worker", "state": "alive", "flags": ["rpc"],
                       "endpoints": {"tunnel": "tcp://127.0.0.1:1"}, "mem_free": 1024 * MIB}

    def peers(self):
        if self.failures:
            self.failures -= 1
            raise self.error
        return Done([self.worker])

    def records(self):
        return Done([])

    def update_own(self, **fields):
        return Done()


class Gateway:
    def hold_engine(self, on_idle):
        on_idle()

    def release_engine(self):
        pass

    def engine_failed(self, problem):
        pass


class Supervisor:
    def __init__(self):
        self.restarts = 0

    def restart_child(self, name):
        self.restarts += 1


class Entry:
    local_port = 4242

    def __init__(self):
        self.stopped = False

    def stop(self):
        self.stopped = True


@pytest.mark.parametrize("error", [pykka.Timeout("injected"), RuntimeError("injected")], ids=["timeout", "bug"])
def test_a_failed_reshard_is_tried_again_until_it_succeeds(error, caplog):
    """The hazard of issue 10: one TimeoutError used to stop re-sharding for good."""
    sup, ledger, watch = Supervisor(), FlakyLedger(2, error), Watch()
    ref = SharderActor.start(PlanBox(), Gateway(), sup, ledger, lambda remote, curve="": Entry(),
                             Device("local", "me", "", 4096 * MIB), None, 0.05, None, None, "s" * 16, 0.05,
                             watch=watch)
    try:
        with caplog.at_level(logging.WARNING, logger="zswarm"):
            notify([ref], "ledger_changed")  # the look fails, and so does the first re-shard
            wait_for(lambda: sup.restarts == 1, 10, what="the re-shard")
        assert ref.is_alive() and ledger.failures == 0
        counted = watch.stats.snapshot().get("actor_errors_sharder", 0)
        if isinstance(error, pykka.Timeout):  # the ledger was busy: said, not counted as a bug
            assert counted == 0 and sum("postponed" in r.getMessage() for r in caplog.records) == 2
        else:
            failed = [r for r in caplog.records if r.name == "zswarm.actors.base"]
            assert counted == 2 and len(failed) == 2 and all(r.exc_info for r in failed)
    finally:
        ref.stop()


def test_a_dead_sharder_releases_its_tunnels_and_says_why(monkeypatch):
    entries = []

    def open_tunnel(remote, curve=""):
        entries.append(Entry())
        return entries[-1]
    sup, watch = Supervisor(), Watch()
    ref = SharderActor.start(PlanBox(), Gateway(), sup, FlakyLedger(0, RuntimeError()), open_tunnel,
                             Device("local", "me", "", 4096 * MIB), None, 0.05, None, None, "s" * 16, 0.05,
                             watch=watch)
    notify([ref], "ledger_changed")
    wait_for(lambda: sup.restarts == 1, 10, what="the re-shard")
    assert len(entries) == 1 and not entries[0].stopped
    monkeypatch.setattr(SharderActor, "handle", _raise(SystemExit("injected")))
    ref.tell(Poison())
    wait_for(lambda: watch.status()["actors"]["sharder"] == "failed", 5, what="its word to the watch")
    assert not ref.is_alive() and entries[0].stopped
    assert watch.why(ref.actor_urn) == "SystemExit: injected"
    assert watch.stats.snapshot()["actor_failures_sharder"] == 1


def test_a_subclass_that_overrides_on_receive_is_refused():
    with pytest.raises(TypeError, match="on_receive is the guard"):
        class Bad(GuardedActor):
            def on_receive(self, message):
                pass


def _raise(e: BaseException):
    def raiser(*args, **kwargs):
        raise e
    return raiser


@pytest.fixture(autouse=True)
def _no_child_left():
    yield
    wait_for(lambda: not node_mod._child_pids(), 5, what="the test's children to exit")
