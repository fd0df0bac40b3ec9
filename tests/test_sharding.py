import pytest

from zswarm.footprint import Footprint, Shape
from zswarm.sharding import MIB, Device, ShortOfMemory, make_plan, parse_size


def dev(i, mem_mib, local=False):
    return Device("local" if local else i, i, "" if local else f"127.0.0.1:{5000 + len(i)}", mem_mib * MIB)


def small(n_layer=10, layer_mib=10, host_mib=0, ctx=256):
    """A footprint with negligible buffers: what matters is the layers' bytes."""
    shape = Shape(n_layer=n_layer, n_embd=8, n_ff=8, n_head=1, n_head_kv=1, n_vocab=8, kv_width=2)
    return Footprint(shape, ctx, (layer_mib * MIB,) * n_layer, host_mib * MIB)


def test_split_follows_memory_and_local_goes_last():
    p = make_plan([dev("b", 300), dev("a", 100)], dev("me", 400, local=True), small())
    assert [d.id for d in p.devices] == ["a", "b", "local"]
    assert p.weights == pytest.approx((0.125, 0.375, 0.5))
    assert p.has_local and [d.id for d in p.remote] == ["a", "b"]
    # no footprint (an unreadable header): by memory, unchecked
    assert make_plan([dev("a", 1), dev("b", 3)], None, None).weights == pytest.approx((0.25, 0.75))


def test_shortfall_is_named():
    with pytest.raises(ShortOfMemory, match=r"needs about 101 MiB at context 256 \(weights 100 MiB, .*\): short by 51 MiB"):
        make_plan([dev("a", 50)], None, small())
    with pytest.raises(ShortOfMemory, match="no device"):
        make_plan([], None, small())


def test_each_device_must_hold_its_share_with_its_compute_buffer():
    # the embedded model's shape at context 256: ~31.7 MiB of layers and ~10 MiB of compute per
    # worker for half the model (llama.cpp allocated 31.71 + 2.81 + 10.4 MiB on each)
    shape = Shape(n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, n_vocab=49152, kv_width=384)
    fp = Footprint(shape, 256, (2_216_448,) * 30, 30_083_328)
    plan = make_plan([dev("a", 64), dev("b", 64)], None, fp)  # the file (92 MiB) fits in neither alone
    assert plan.weights == pytest.approx((0.5, 0.5))
    with pytest.raises(ShortOfMemory, match="short by"):
        make_plan([dev("a", 40), dev("b", 40)], None, fp)
    # by memory, 20 + 100 MiB gives the small worker 5 layers: 11.5 MiB + 10.4 MiB of compute,
    # too much for it; the split by what is left after the compute buffers fits (3 layers)
    plan = make_plan([dev("a", 20), dev("b", 100)], None, fp)
    assert plan.weights[0] < 20 / 120
    # a worker smaller than its compute buffer takes no layer: it is left out, not in the way
    plan = make_plan([dev("a", 5), dev("b", 5), dev("c", 500)], None, fp)
    assert [d.id for d in plan.devices] == ["c"]
    with pytest.raises(ShortOfMemory, match="short by 70 MiB"):
        make_plan([dev("a", 5), dev("b", 5), dev("c", 20)], None, fp)
    # the host alone loads it as one CPU does: its compute buffer is not the split's
    assert fp.single() < 160 * MIB
    assert make_plan([], dev("me", 160, local=True), fp).devices[0].local
    with pytest.raises(ShortOfMemory, match="short by"):
        make_plan([], dev("me", 100, local=True), fp)


@pytest.mark.parametrize("text,value", [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5G", 1_500_000_000),
                                        ("100", 100), ("3 gb", 3_000_000_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "2XB", "-1G"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


# --- who holds which worker (one server at a time), no sockets ---

from zswarm.sharding import Claim, claim_step, claims_of_records, holders  # noqa: E402

SETTLE = 2.0


def step(me, usable, claims, states=None, now=100.0, known=()):
    return claim_step(me, usable, known, claims, states or {}, now, SETTLE)


def test_a_held_claim_beats_a_fresh_one_whatever_the_clock():
    old = Claim("b", "w", since=500.0, held=True)  # b's clock runs late
    fresh = Claim("a", "w", since=10.0)
    assert holders([fresh, old], {"a": "alive", "b": "alive"})["w"] == old
    # between claims of one kind: the earlier claim, then the lower server id
    assert holders([Claim("b", "w", 1.0), Claim("a", "w", 2.0)], {"a": "alive", "b": "alive"})["w"].server == "b"
    assert holders([Claim("b", "w", 1.0), Claim("a", "w", 1.0)], {"a": "alive", "b": "alive"})["w"].server == "a"


def test_only_servers_the_ledger_holds_keep_their_claims():
    claims = [Claim("a", "w", 1.0, True), Claim("b", "w", 2.0, True)]
    assert holders(claims, {"a": "suspect", "b": "alive"})["w"].server == "a"  # a busy host keeps its worker
    assert holders(claims, {"a": "dead", "b": "alive"})["w"].server == "b"  # declared dead: released
    assert holders(claims, {"b": "alive"})["w"].server == "b"  # left, or removed
    assert holders(claims, {}) == {}


def test_a_free_worker_is_claimed_then_used_once_the_claim_has_stood():
    s = step("a", ["w"], [])
    assert s.claims == (Claim("a", "w", 100.0),) and s.settling == ("w",) and s.use == ()
    assert s.settles_at(SETTLE) == 102.0
    s = step("a", ["w"], list(s.claims), now=101.0)
    assert s.use == () and s.settling == ("w",)
    s = step("a", ["w"], list(s.claims), now=102.0)
    assert s.claims == (Claim("a", "w", 100.0, True),) and s.use == ("w",) and s.settling == ()
    assert s.settles_at(SETTLE) is None


def test_a_worker_held_by_another_server_is_skipped_and_never_claimed():
    theirs = Claim("b", "w", 50.0, True)
    s = step("a", ["w", "x"], [theirs], {"b": "alive"})
    assert s.taken == {"w": "b"} and [c.worker for c in s.claims] == ["x"] and s.lost == ()


def test_two_servers_claiming_one_free_worker_at_once_agree_on_one():
    states = {"a": "alive", "b": "alive"}
    for ta, tb in [(100.0, 100.4), (100.4, 100.0), (100.0, 100.0)]:
        # each claims without having seen the other's claim
        a = step("a", ["w"], [], states, now=ta)
        b = step("b", ["w"], [], states, now=tb)
        # then both records reach both servers, in whatever order
        both = list(a.claims) + list(b.claims)
        a2 = step("a", ["w"], both, states, now=100.5)
        b2 = step("b", ["w"], list(reversed(both)), states, now=100.5)
        winner = "a" if (ta, "a") < (tb, "b") else "b"
        loser, lstep, wstep = ("b", b2, a2) if winner == "a" else ("a", a2, b2)
        assert lstep.lost == ("w",) and lstep.taken == {"w": winner} and lstep.claims == ()
        assert wstep.lost == () and [c.worker for c in wstep.claims] == ["w"]
        # the loser does not come back for it while the winner holds it, and the winner uses it
        later = 103.0
        w3 = step(winner, ["w"], list(wstep.claims), states, now=later)
        l3 = step(loser, ["w"], list(w3.claims) + list(lstep.claims), states, now=later)
        assert w3.use == ("w",) and l3.claims == () and l3.taken == {"w": winner}


def test_two_servers_that_both_hold_one_worker_resolve_to_the_earlier_claim():
    # a partition: each held w while it could not hear the other
    states = {"a": "alive", "b": "alive"}
    ca, cb = Claim("a", "w", 10.0, True), Claim("b", "w", 20.0, True)
    assert step("b", ["w"], [ca, cb], states).lost == ("w",)
    assert step("a", ["w"], [ca, cb], states).use == ("w",)


def test_a_dead_holder_frees_its_worker_for_the_next_server():
    theirs = Claim("a", "w", 10.0, True)
    assert step("b", ["w"], [theirs], {"a": "suspect"}).taken == {"w": "a"}
    s = step("b", ["w"], [theirs], {"a": "dead"})
    assert s.taken == {} and s.claims == (Claim("b", "w", 100.0),)


def test_a_claim_survives_a_worker_briefly_unusable_and_ends_when_it_is_gone():
    mine = Claim("a", "w", 10.0, True)
    s = step("a", [], [mine], known=["w"])  # suspect, or its RPC server restarting
    assert s.claims == (mine,) and s.use == () and s.settling == ()
    s = step("a", ["w"], list(s.claims))
    assert s.use == ("w",)  # back: ours at once, no new settle wait
    assert step("a", [], [mine]).claims == ()  # dead or gone: let go


def test_claims_of_records_skip_junk():
    records = [{"id": "a", "claims": [{"worker": "w", "since": 1.5, "held": True}, {"worker": 3}, "x",
                                       {"worker": "v", "since": True}]},
               {"id": 7, "claims": [{"worker": "w", "since": 1.0}]}, "junk", {"id": "b"},
               {"id": "c", "claims": None}]
    assert claims_of_records(records) == [Claim("a", "w", 1.5, True)]


def test_many_servers_with_delayed_gossip_converge_to_one_holder_per_worker():
    """Servers step on their own views of the others' claims, which arrive late and out of order;
    once gossip catches up, every worker has one holder, every server agrees, and no two use one."""
    import random

    rnd = random.Random(11)
    servers = ["s1", "s2", "s3", "s4"]
    workers = ["w1", "w2", "w3"]
    states = {s: "alive" for s in servers}
    mine = {s: () for s in servers}
    seen = {s: {o: () for o in servers if o != s} for s in servers}  # what s has heard of o's claims
    now = 100.0
    for _ in range(60):
        now += rnd.uniform(0.05, 0.6)
        s = rnd.choice(servers)
        heard = [c for o in seen[s].values() for c in o]
        mine[s] = step(s, workers, heard + list(mine[s]), states, now=now).claims
        for o in servers:  # gossip: some servers hear s's new record now, others later
            if o != s and rnd.random() < 0.5:
                seen[o][s] = mine[s]
    for _ in range(3):  # gossip catches up; everyone steps again
        for s in servers:
            seen_all = [c for o in servers if o != s for c in mine[o]]
            now += 1.0
            mine[s] = step(s, workers, seen_all + list(mine[s]), states, now=now).claims
    everyone = [c for s in servers for c in mine[s]]
    owners = holders(everyone, states)
    assert set(owners) == set(workers)
    for s in servers:
        view = step(s, workers, everyone, states, now=now + SETTLE)
        assert set(view.use) == {w for w, c in owners.items() if c.server == s}
        assert view.taken == {w: c.server for w, c in owners.items() if c.server != s}
    assert all(sum(c.worker == w for c in everyone) == 1 for w in workers)  # the losers let go


def test_a_claim_counts_for_no_more_than_the_cap_and_what_the_rpc_server_reported():
    from zswarm.sharding import counted_memory

    GiB = 1 << 30
    assert counted_memory(2 * GiB, 1 << 40, None) == 2 * GiB  # an honest claim, not reported yet
    assert counted_memory(1 << 60, 1 << 40, None) == 1 << 40  # 2^60 bytes "free": the cap
    assert counted_memory(8 * GiB, 1 << 40, 3 * GiB) == 3 * GiB  # more than its RPC server has
    assert counted_memory(2 * GiB, 1 << 40, 3 * GiB) == 2 * GiB  # lends less than it has: its claim
    # the capped liar no longer takes every layer from an honest 8 GiB worker
    plan = make_plan([Device("liar", "liar", "a:1", counted_memory(1 << 60, 16 * GiB, None)),
                      Device("honest", "honest", "b:1", 8 * GiB)], None, small())
    assert {d.id: round(w, 2) for d, w in zip(plan.devices, plan.weights)} == {"liar": 0.67, "honest": 0.33}
