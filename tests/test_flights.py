"""The gateway's request table (zswarm.flights), without sockets: every path a request can take.

The table acts only through the two callables it is given, so these tests record what it sends
to nodes and answers to clients, and drive time with a hand-turned clock.
"""

from __future__ import annotations

import pytest

from zswarm import wire
from zswarm.balancing import Route, Router, RouteTable
from zswarm.flights import Table

LOCAL = Route("me", "", ("m",), "me")
PEER_A = Route("a", "tcp://10.0.0.1:1", ("m",), "alpha")
PEER_B = Route("b", "tcp://10.0.0.2:1", ("m",), "beta")
CLIENT = ("local", b"c1")
PEER_CLIENT = ("peer", b"p1")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Harness:
    def __init__(self, *routes: Route, engine: bool = True, **kw) -> None:
        self.clock = Clock()
        self.sent: list[tuple[str, wire.Inference]] = []  # (node, body)
        self.answers: list[tuple[tuple[str, bytes], wire.Inference]] = []
        self.refuse: set[str] = set()  # nodes whose send fails (no connection)
        self.counts: dict[str, int] = {}
        router = Router(policy="round-robin", clock=self.clock)
        self.linked: set[str] = set()  # peer endpoints whose connection is up
        self.table = Table("me", router, self._send, self._reply, count=self._count,
                           clock=self.clock, wall=lambda: self.clock.t + 5e8,
                           linked=lambda ep: ep in self.linked, **kw)
        self.table.set_routes(RouteTable(tuple(routes)))
        if engine:
            self.table.engine_up()

    def _send(self, route: Route, body: wire.Inference) -> bool:
        if route.node in self.refuse:
            return False
        self.sent.append((route.node, body))
        return True

    def _reply(self, origin, body, raw) -> None:
        self.answers.append((origin, body))

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def ask(self, rid: str = "r1", origin=CLIENT, **kw) -> wire.GenRequest:
        req = wire.GenRequest(id=rid, kind="completion", model=kw.pop("model", "m"), prompt="hi", **kw)
        self.table.request(req, origin)
        return req

    def requests_to(self, node: str) -> list[wire.GenRequest]:
        return [b for n, b in self.sent if n == node and isinstance(b, wire.GenRequest)]

    def last_to(self) -> str:
        return [n for n, b in self.sent if isinstance(b, wire.GenRequest)][-1]

    def source(self, node: str) -> str:
        return {r.node: r.endpoint for r in (LOCAL, PEER_A, PEER_B)}[node]

    def reply(self, node: str, body: wire.Inference) -> None:
        self.table.on_reply(self.source(node), body, b"raw")

    def answer_bodies(self) -> list[wire.Inference]:
        return [b for _, b in self.answers]


def done(rid: str = "r1", node: str = "") -> wire.Done:
    return wire.Done(id=rid, finish_reason="stop", prompt_tokens=1, completion_tokens=1, node=node)


def test_dispatch_and_done():
    h = Harness(PEER_A)
    h.ask()
    assert h.last_to() == "a"
    h.reply("a", wire.Chunk("r1", "x"))
    h.reply("a", done())
    assert [type(b).__name__ for b in h.answer_bodies()] == ["Chunk", "Done"]
    assert h.table.flights == {}
    assert h.table.router.in_flight == {"a": 0} and h.table.router.served == {"a": 1}


def test_streamed_request_is_retried_before_its_first_chunk_only():
    h = Harness(PEER_A, PEER_B)
    h.ask()
    first = h.last_to()
    h.table.link_lost(h.source(first), "lost the connection to node {node}")
    second = h.last_to()
    assert second != first and h.counts["requests_retried"] == 1
    h.reply(second, wire.Chunk("r1", "x"))
    h.table.link_lost(h.source(second), "lost the connection to node {node}")
    fail = h.answer_bodies()[-1]
    assert isinstance(fail, wire.Fail) and fail.code == "engine_down" and fail.started
    assert "cut short" in fail.message and h.table.flights == {}


def test_whole_answer_is_held_and_retried_after_chunks():
    h = Harness(PEER_A, PEER_B)
    h.ask(whole=True)
    first = h.last_to()
    h.reply(first, wire.Chunk("r1", "par"))
    assert h.answers == []  # held: the client has seen nothing
    h.reply(first, wire.Fail(id="r1", code="engine_down", message="died", started=True))
    second = h.last_to()
    assert second != first
    h.reply(second, wire.Chunk("r1", "Hel"))
    h.reply(second, wire.Chunk("r1", "lo"))
    h.reply(second, done())
    bodies = h.answer_bodies()
    assert [type(b).__name__ for b in bodies] == ["Chunk", "Done"]
    assert bodies[0].text == "Hello"  # the dead node's "par" is gone


def test_planned_restart_parks_a_request_queued_in_the_engine():
    h = Harness(LOCAL)
    h.ask()
    assert h.last_to() == "me"
    idle = []
    h.table.hold(lambda: idle.append(1))
    assert idle == []  # the request is still on the engine
    h.reply("me", wire.Fail(id="r1", code="engine_down", message="stopping"))
    assert idle == [1] and list(h.table.parked) == ["r1"]
    h.ask("r2")
    assert list(h.table.parked) == ["r1", "r2"] and h.answers == []
    h.table.engine_down("restarting")
    h.table.engine_up()
    assert [r.id for r in h.requests_to("me")] == ["r1", "r1", "r2"]
    assert h.table.parked == {}


def test_crashed_engine_whose_route_vanished_is_waited_for():
    h = Harness(LOCAL)
    h.table.engine_down("the engine exited")
    h.table.set_routes(RouteTable(()))  # the ledger no longer lists our model
    h.ask()
    assert list(h.table.parked) == ["r1"] and h.answers == []
    h.table.set_routes(RouteTable((LOCAL,)))
    h.table.engine_up()
    assert h.last_to() == "me"


def test_engine_failed_fails_parked_requests_with_its_reason():
    h = Harness(LOCAL)
    h.table.engine_down("exited")
    h.ask()
    h.table.engine_failed("the model file is not a GGUF file")
    fail = h.answer_bodies()[-1]
    assert fail.code == "engine_down" and "GGUF" in fail.message and h.table.parked == {}


def test_a_failed_engine_serves_no_model_though_its_route_is_listed():
    h = Harness(LOCAL, Route("a", "tcp://10.0.0.1:1", ("other",), "alpha"))
    h.table.engine_failed("the build cannot run here")
    assert h.table.models() == ["other"] and h.table.local_models() == []
    h.table.engine_failed("")  # tried again: it may come back
    assert h.table.models() == ["m", "other"]


def test_engine_that_fails_during_a_reshard_is_no_longer_held():
    h = Harness(LOCAL)
    h.table.hold(lambda: None)
    h.ask()
    h.table.engine_failed("the build cannot run here")
    assert not h.table.held and h.answer_bodies()[-1].code == "engine_down"


def test_park_ends_after_park_s():
    h = Harness(LOCAL, park_s=10)
    h.table.engine_down("exited")
    h.ask()
    h.clock.t += 9
    h.table.tick()
    assert h.answers == []
    h.table.set_routes(RouteTable((LOCAL,)))  # tried again, parked again: the wait counts from the first
    h.clock.t += 2
    h.table.tick()
    assert h.answer_bodies()[-1].code == "engine_down" and h.table.flights == {}


def test_late_reply_from_a_node_the_request_left_is_dropped():
    h = Harness(PEER_A, PEER_B)
    h.ask()
    first = h.last_to()
    h.table.link_lost(h.source(first), "lost {node}")
    h.reply(first, wire.Chunk("r1", "stale"))
    h.reply(first, done())
    assert h.answers == [] and "r1" in h.table.flights
    assert h.counts["late_replies"] == 2


def test_reply_for_an_unknown_request_is_dropped():
    h = Harness(PEER_A)
    h.reply("a", done("nobody"))
    assert h.answers == []


def test_cancel_reaches_the_node_and_says_nothing_about_its_health():
    h = Harness(PEER_A)
    for i in range(3):
        h.ask(f"r{i}")
        h.table.cancel(f"r{i}", CLIENT)
    assert [type(b).__name__ for _, b in h.sent].count("Cancel") == 3
    assert h.table.router.cooling() == [] and h.table.router.in_flight == {"a": 0}
    assert h.table.flights == {} and h.answers == []


def test_only_its_own_client_may_cancel_a_request():
    h = Harness(PEER_A)
    h.ask()
    h.table.cancel("r1", ("local", b"someone-else"))
    assert "r1" in h.table.flights


def test_cancel_of_a_parked_request():
    h = Harness(LOCAL)
    h.table.engine_down("exited")
    h.ask()
    h.table.cancel("r1", CLIENT)
    assert h.table.parked == {} and h.table.flights == {}


def test_deadline_fails_with_timeout_cancels_and_cools_the_node():
    h = Harness(PEER_A, PEER_B)
    h.ask(timeout_s=5.0)
    slow = h.last_to()
    h.clock.t += 4.9
    h.table.tick()
    assert h.answers == []
    h.clock.t += 0.2
    h.table.tick()
    fail = h.answer_bodies()[-1]
    assert fail.code == "timeout" and wire.FAIL_CODES[fail.code] == 504 and "5 s" in fail.message
    assert isinstance(h.sent[-1][1], wire.Cancel) and h.sent[-1][0] == slow
    assert h.table.router.cooling() == [slow]  # one timeout is enough: not chosen again at once
    for i in range(4):
        h.ask(f"n{i}")
        assert h.last_to() != slow


def test_a_timeout_reported_by_the_serving_node_cools_it_too():
    h = Harness(PEER_A, PEER_B)
    h.ask(timeout_s=5.0)
    slow = h.last_to()
    h.reply(slow, wire.Fail(id="r1", code="timeout", message="deadline passed"))
    assert h.answer_bodies()[-1].code == "timeout" and h.table.router.cooling() == [slow]


def test_a_request_that_is_its_own_fault_does_not_count_against_the_node():
    h = Harness(PEER_A, PEER_B)
    for i in range(3):
        h.ask(f"r{i}", target_node="a")
        h.reply("a", wire.Fail(id=f"r{i}", code="context_length", message="too long"))
    assert h.table.router.cooling() == []


def test_parked_request_times_out_at_its_deadline():
    h = Harness(LOCAL)
    h.table.engine_down("exited")
    h.ask(timeout_s=3.0)
    h.clock.t += 3.0
    h.table.tick()
    assert h.answer_bodies()[-1].code == "timeout" and h.table.parked == {}


def test_deadline_is_rebased_for_the_next_hop():
    h = Harness(PEER_A)
    h.clock.t += 0
    h.table.engine_down("none")
    h.ask(timeout_s=10.0)
    out = h.requests_to("a")[-1]
    assert out.hops == 1 and out.timeout_s == pytest.approx(10.0)
    assert out.deadline == pytest.approx(h.clock.t + 5e8 + 10.0)


def test_wall_clock_deadline_from_an_older_node_is_honoured():
    h = Harness(LOCAL)
    h.ask(deadline=h.clock.t + 5e8 + 2.0)  # wall clock is clock + 5e8 in this harness
    h.clock.t += 2.0
    h.table.tick()
    assert h.answer_bodies()[-1].code == "timeout"


def test_unknown_model_is_404_but_a_recently_served_one_is_503():
    h = Harness(PEER_A)
    h.ask("r1", model="other")
    assert h.answer_bodies()[-1].code == "model_not_found"
    h.table.set_routes(RouteTable(()))  # the only node vanished a moment ago
    assert h.table.recent_models() == ["m"]
    h.ask("r2")
    fail = h.answer_bodies()[-1]
    assert fail.code == "no_node" and wire.FAIL_CODES["no_node"] == 503
    h.clock.t += 601
    assert h.table.recent_models() == []
    h.ask("r3")
    assert h.answer_bodies()[-1].code == "model_not_found"


def test_an_exception_while_dispatching_ends_the_request_at_once():
    h = Harness(PEER_A)

    def broken(route, body):
        raise RuntimeError("Too many open files")
    h.table._send = broken
    h.ask()
    fail = h.answer_bodies()[-1]
    assert fail.code == "internal" and h.table.flights == {} and h.counts["dispatch_errors"] == 1
    assert h.table.router.in_flight == {"a": 0}


def test_a_send_that_cannot_be_taken_tries_another_node():
    h = Harness(PEER_A, PEER_B)
    h.refuse = {"a"}
    h.ask()
    h.ask("r2")
    assert {n for n, _ in h.sent} == {"b"}


def test_gives_up_after_max_attempts():
    h = Harness(PEER_A, PEER_B, max_attempts=2)
    h.ask()
    for _ in range(2):
        node = h.last_to()
        h.reply(node, wire.Fail(id="r1", code="overloaded", message="busy"))
    fail = h.answer_bodies()[-1]
    assert fail.code == "overloaded" and h.table.flights == {}


def test_a_request_nobody_can_take_fails():
    h = Harness(PEER_A)
    h.refuse = {"a"}
    h.ask()
    assert h.answer_bodies()[-1].code in ("engine_down", "no_node")
    assert h.table.flights == {}


def test_node_leaving_the_cluster_retries_its_requests():
    h = Harness(PEER_A, PEER_B)
    h.ask()
    first = h.last_to()
    h.table.set_routes(RouteTable(tuple(r for r in (PEER_A, PEER_B) if r.node != first)))
    assert h.last_to() != first and "r1" in h.table.flights


def test_a_stream_on_a_node_that_drops_out_of_the_table_goes_on_while_its_link_is_up():
    h = Harness(PEER_A)
    h.linked = {PEER_A.endpoint}
    h.ask("streaming")
    h.reply("a", wire.Chunk("streaming", "x"))
    h.ask("waiting", whole=True)
    h.table.set_routes(RouteTable((PEER_B,)))  # the ledger suspects "a": unlisted, link still up
    assert h.table.flights["streaming"].route.node == "a"  # not cut
    assert h.table.flights["waiting"].route.node == "b"  # nothing seen yet: moved at once
    h.reply("a", done("streaming"))
    assert isinstance(h.answer_bodies()[-1], wire.Done)


def test_a_stream_on_an_unlisted_node_whose_link_is_down_is_cut():
    h = Harness(PEER_A)
    h.ask()
    h.reply("a", wire.Chunk("r1", "x"))
    h.table.set_routes(RouteTable(()))
    fail = h.answer_bodies()[-1]
    assert isinstance(fail, wire.Fail) and fail.started and h.table.flights == {}


def test_a_node_that_comes_back_is_forgiven_its_cooldown():
    h = Harness(PEER_A, PEER_B)
    h.ask(target_node="a", timeout_s=1.0)
    h.clock.t += 1.0
    h.table.tick()
    assert h.table.router.cooling() == ["a"]
    h.table.set_routes(RouteTable((PEER_B,)))  # partitioned away...
    h.table.set_routes(RouteTable((PEER_A, PEER_B)))  # ...and back
    assert h.table.router.cooling() == []


def test_request_from_a_peer_is_served_by_the_local_engine_only():
    h = Harness(LOCAL, PEER_A)
    h.ask(origin=PEER_CLIENT, hops=1)
    assert h.last_to() == "me"
    h.table.engine_down("exited")  # the engine dies under it: the entry point retries, not us
    fail = h.answer_bodies()[-1]
    assert h.answers[-1][0] == PEER_CLIENT and fail.code == "engine_down"
    h.ask("r2", origin=PEER_CLIENT, hops=1)
    assert h.answer_bodies()[-1].code == "engine_down"  # restarting: said at once


def test_request_from_a_peer_waits_during_a_reshard():
    h = Harness(LOCAL)
    h.table.hold(lambda: None)
    h.ask(origin=PEER_CLIENT, hops=1)
    assert list(h.table.parked) == ["r1"]
    h.table.release()
    assert h.last_to() == "me"


def test_duplicate_ids_and_routing_loops_are_refused():
    h = Harness(PEER_A)
    h.ask()
    h.ask()
    assert h.answer_bodies()[-1].code == "bad_request"
    h.ask("r2", origin=PEER_CLIENT, hops=2)
    assert h.answer_bodies()[-1].code == "bad_request"
    assert list(h.table.flights) == ["r1"]


def test_hold_calls_on_idle_at_once_when_the_engine_has_nothing():
    h = Harness(LOCAL, PEER_A)
    idle = []
    h.table.hold(lambda: idle.append(1))
    assert idle == [1]
    h.ask()
    assert h.last_to() == "a"  # held: another node takes it


def test_a_suspect_node_is_chosen_only_when_no_other_serves_the_model():
    suspect_a = Route("a", PEER_A.endpoint, ("m",), "alpha", suspect=True)
    h = Harness(suspect_a, PEER_B)
    for i in range(4):
        h.ask(f"r{i}")
        assert h.last_to() == "b"
    h.table.set_routes(RouteTable((suspect_a,)))
    h.ask("last")
    assert h.last_to() == "a"  # better a node that may answer than a 503


def test_a_peer_gateway_must_be_tcp():
    from zswarm.balancing import peer_gateway

    assert peer_gateway("tcp://10.0.0.1:7341")
    assert not peer_gateway("ipc:///var/lib/zswarm/server/admin.sock")  # a member that lies
    assert not peer_gateway("inproc://zeromq.zap.01")
    assert not peer_gateway("tcp://" + "a" * 300 + ":1")
