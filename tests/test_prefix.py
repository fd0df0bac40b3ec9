"""Prefix chains and the router's prefix and speed rules: pure logic, no socket."""

import random

from zswarm import wire
from zswarm.balancing import LOAD_SLACK, Route, Router, RouteTable
from zswarm.prefix import BLOCK_CHARS, MAX_BLOCKS, chain, request_chain, shared

SYSTEM = "You are a careful assistant for the lighthouse keepers' guild. " * 40  # ~2500 characters


def chat(*contents):
    roles = ["system"] + ["user", "assistant"] * len(contents)
    return wire.GenRequest(id="r", kind="chat", model="m",
                           messages=[wire.ChatMessage(role=r, content=c) for r, c in zip(roles, contents)])


def test_a_conversations_next_turn_starts_with_the_previous_chain():
    turn1 = request_chain(chat(SYSTEM, "How tall is the tower?"))
    turn2 = request_chain(chat(SYSTEM, "How tall is the tower?", "About 40 metres.", "And the lamp?"))
    assert len(turn1) >= 9
    assert shared(turn1, turn2) >= len(turn1) - 1  # all but the block the first turn ended in
    other = request_chain(chat("You are a pirate. " * 150, "How tall is the tower?"))
    assert shared(turn1, other) == 0


def test_chains_count_whole_blocks_only_and_are_capped():
    assert chain("x" * (BLOCK_CHARS - 1)) == ()
    assert len(chain("x" * (BLOCK_CHARS * 3 + 5))) == 3
    assert len(chain("y" * BLOCK_CHARS * (MAX_BLOCKS + 10))) == MAX_BLOCKS
    assert all(0 <= h < 1 << 63 for h in chain("z" * BLOCK_CHARS * 4))
    # the same text in another field is another prompt
    assert request_chain(chat("a" * 600)) != chain("a" * 600)


def _router(*routes, policy="prefix"):
    r = Router(policy=policy, rng=random.Random(7))
    r.table = RouteTable(tuple(routes))
    return r


def test_a_request_follows_the_node_that_holds_its_prefix_until_it_is_busier():
    c = request_chain(chat(SYSTEM, "Hello"))
    a, b, d = (Route(n, f"tcp://{n}:1", ("m",), n) for n in "abd")
    holder = Route("b", "tcp://b:1", ("m",), "b", prefixes=(c,))
    router = _router(a, holder, d)
    assert {router.pick("m", chain=c).node for _ in range(20)} == {"b"}
    assert router.prefix_routed == {"b": 20}
    for _ in range(LOAD_SLACK):  # busier by the slack: still it
        router.started("b")
    assert router.pick("m", chain=c).node == "b"
    router.started("b")  # one past the bound: the others, by speed
    assert {router.pick("m", chain=c).node for _ in range(20)} <= {"a", "d"}


def test_the_entry_remembers_where_it_finished_a_prompt():
    c = request_chain(chat(SYSTEM, "Hello"))
    routes = [Route(n, f"tcp://{n}:1", ("m",), n) for n in "abc"]
    router = _router(*routes)
    first = router.pick("m", chain=c).node
    router.started(first)
    router.finished(first, ok=True)
    router.remember(first, c)
    turn2 = request_chain(chat(SYSTEM, "Hello", "Hi!", "What is a lamp?"))
    assert {router.pick("m", chain=turn2).node for _ in range(10)} == {first}


def test_the_local_engines_own_chains_count_for_the_local_route():
    c = request_chain(chat(SYSTEM, "Hello"))
    router = _router(Route("me", "", ("m",), "me"), Route("p", "tcp://p:1", ("m",), "p"))
    router.local_prefixes = (c,)
    assert router.pick("m", chain=c).local


def _simulate(policy, seconds=750.0):
    """Requests arrive at 4 a second, each 50 tokens, on two nodes at 100 tokens/s and one at 25
    (2/3 of what the three serve together). Returns (each node's share, the p99 time to answer)."""
    routes = [Route("f1", "tcp://f1:1", ("m",), decode_tps=100.0), Route("f2", "tcp://f2:1", ("m",), decode_tps=100.0),
              Route("slow", "tcp://s:1", ("m",), decode_tps=25.0)]
    router = _router(*routes, policy=policy)
    speed = {r.node: r.decode_tps for r in routes}
    busy_until = {r.node: 0.0 for r in routes}
    ends: list[tuple[float, str]] = []
    picks = {r.node: 0 for r in routes}
    times = []
    t = 0.0
    while t < seconds:
        t += 0.25
        for end, node in sorted(ends):
            if end <= t:
                router.finished(node, ok=True)
                ends.remove((end, node))
        node = router.pick("m").node
        picks[node] += 1
        router.started(node)
        busy_until[node] = max(busy_until[node], t) + 50 / speed[node]
        ends.append((busy_until[node], node))
        times.append(busy_until[node] - t)
    n = sum(picks.values())
    return {k: v / n for k, v in picks.items()}, sorted(times)[int(0.99 * len(times))]


def test_no_prefix_falls_back_to_expected_time_and_a_slow_node_gets_proportionally_less():
    (share, p99), (share_p2c, p99_p2c) = _simulate("prefix"), _simulate("p2c")
    # proportionally fewer: the slow node's share of a fast node's is at most its speed's (1/4),
    # yet it is used; and the answers come sooner than with counts alone
    assert 0 < share["slow"] <= 0.25 * share["f1"], share
    assert p99 < 0.7 * p99_p2c, (p99, p99_p2c)


def test_an_unmeasured_node_counts_as_the_median_speed():
    router = _router(Route("new", "tcp://n:1", ("m",)), Route("old", "tcp://o:1", ("m",), decode_tps=80.0))
    assert {router.pick("m").node for _ in range(40)} == {"new", "old"}  # tried, not starved


def test_prefill_speed_counts_for_long_prompts():
    """Two nodes that generate alike, one four times slower at reading prompts: a long prompt goes
    to the fast reader even when it has a request more in flight; a prompt of a few tokens does not."""
    fast = Route("fast", "tcp://f:1", ("m",), decode_tps=50.0, prefill_tps=800.0)
    slow = Route("slow", "tcp://s:1", ("m",), decode_tps=50.0, prefill_tps=200.0)
    router = _router(fast, slow)
    router.started("fast")
    assert {router.pick("m", work=(2000.0, 16.0)).node for _ in range(20)} == {"fast"}
    assert {router.pick("m", work=(5.0, 128.0)).node for _ in range(20)} == {"slow"}


def test_equal_machines_measured_a_little_apart_share_alike():
    """Speeds measured 5% apart are the same machine to the router: ties go either way, as with p2c,
    instead of every request to the node that measured faster."""
    a = Route("a", "tcp://a:1", ("m",), decode_tps=100.0, prefill_tps=500.0)
    b = Route("b", "tcp://b:1", ("m",), decode_tps=95.0, prefill_tps=475.0)
    router = _router(a, b)
    picks = [router.pick("m").node for _ in range(200)]
    assert 60 <= picks.count("b") <= 140, picks.count("b")
