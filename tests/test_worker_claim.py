"""A worker belongs to one server at a time (llama.cpp's RPC server serves one client).

Three layers: two real Sharder actors in this process over a scripted ledger (no sockets), which
race for one free worker; what /api/p2p and the Swarm page show (a scripted cluster, headless
Chromium); and, marked slow, the chaos scenario "two servers and one worker": one real worker and
two real `zswarm server --p2p` nodes on 127.0.0.1, then the owner stops under load and the other
server takes the worker over. The pure rules are tested in test_sharding.py.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request

import openai
import pykka
import pytest

from cluster import Cluster, child_state, shard, wait_for
from swarm_fakes import browser  # noqa: F401 (fixture)
from zswarm import wire
from zswarm.actors.listener import notify
from zswarm.actors.sharder import PlanBox, SharderActor, holder_status
from zswarm.sharding import MIB, Device
from zswarm.token import Token

MODEL = "smollm2-135m-instruct"


# --- two Sharders in this process, one scripted ledger ---

class Done:
    def __init__(self, value=None):
        self.value = value

    def get(self, timeout=None):
        return self.value


class World:
    """What every node's ledger would converge to: one worker, some servers, their claims.

    A server's ``update_own`` reaches the other servers ``gossip_delay_s`` later (the real ledger
    pushes a changed record at once; a LAN takes milliseconds): long enough here for two servers
    that see a free worker at the same moment to both claim it before either hears the other."""

    def __init__(self, servers, gossip_delay_s=0.1):
        self.lock = threading.Lock()
        self.delay_s = gossip_delay_s
        self.states = {s: "alive" for s in servers}
        self.claims = {s: [] for s in servers}  # what the others have heard
        self.sharders = {}
        self.worker = {"id": "w" * 16, "name": "w1", "role": "worker", "state": "alive",
                       "endpoints": {"tunnel": "tcp://127.0.0.1:1"}, "flags": ["rpc"], "mem_free": 1024 * MIB}

    def ledger(self, me):
        return FakeLedger(self, me)


class FakeLedger:
    def __init__(self, world, me):
        self.world, self.me = world, me

    def peers(self):
        w = self.world
        with w.lock:
            out = [dict(w.worker)]
            out += [{"id": s, "name": s, "role": "server", "state": st, "endpoints": {}, "flags": [], "mem_free": 0}
                    for s, st in w.states.items() if s != self.me and st != "gone"]
            return Done(out)

    def records(self):
        w = self.world
        with w.lock:
            return Done([wire.NodeRecord(id=s, name=s, role="server", incarnation=1, claims=list(c))
                         for s, c in w.claims.items() if w.states[s] != "gone"])

    def update_own(self, claims):
        w = self.world

        def arrive():
            with w.lock:
                w.claims[self.me] = list(claims)
                others = [ref for s, ref in w.sharders.items() if s != self.me]
            notify(others, "ledger_changed")
        t = threading.Timer(w.delay_s, arrive)
        t.daemon = True
        t.start()
        return Done()


class FakeGateway:
    def hold_engine(self, on_idle):
        on_idle()  # nothing in flight

    def release_engine(self):
        pass

    def engine_failed(self, problem):
        self.problem = problem


class FakeSupervisor:
    def __init__(self):
        self.restarts = 0

    def restart_child(self, name):
        self.restarts += 1
        return Done(True)


class FakeEntry:
    local_port = 4242

    def stop(self):
        pass


def start_sharder(world, me):
    box = PlanBox()
    local = Device("local", me, "", 4096 * MIB)
    ref = SharderActor.start(box, FakeGateway(), FakeSupervisor(), world.ledger(me), lambda remote, curve="": FakeEntry(),
                             local, None, 0.0, None, None, me, 0.3)
    ref.proxy().initial_plan().get(timeout=5)
    world.sharders[me] = ref
    return box, ref


def uses_worker(box):
    return box.plan is not None and any(not d.local for d in box.plan.devices)


@pytest.fixture
def actors():
    started = []
    yield started
    for ref in started:
        ref.stop(timeout=5)
    assert pykka.ActorRegistry.get_all() == [], "actors leaked"


def test_two_sharders_racing_for_one_worker_converge_and_the_survivor_takes_it_over(actors, caplog):
    caplog.set_level("INFO", logger="zswarm.actors.sharder")
    world = World(["a" * 16, "b" * 16])
    a, b = world.states
    (box_a, ref_a), (box_b, ref_b) = start_sharder(world, a), start_sharder(world, b)
    actors += [ref_a, ref_b]
    assert not uses_worker(box_a) and not uses_worker(box_b)  # local only until workers appear
    notify([ref_a, ref_b], "ledger_changed")  # both see the free worker at the same moment
    wait_for(lambda: uses_worker(box_a) != uses_worker(box_b), 5, what="one of the two using the worker")
    time.sleep(1.0)  # longer than the claim settle: nobody changes its mind afterwards
    assert uses_worker(box_a) != uses_worker(box_b)
    # both had claimed it (neither had heard the other), and one let go
    assert sum("claimed by server" in r.getMessage() and "first" in r.getMessage() for r in caplog.records) == 1
    owner, other = (a, b) if uses_worker(box_a) else (b, a)
    other_ref = ref_b if owner == a else ref_a
    status = other_ref.proxy().status().get(timeout=5)
    assert status["taken"] == [{"id": world.worker["id"], "name": "w1", "by": owner, "by_name": owner}]
    assert "runs on this node alone" in status["note"] and status["claims"] == []
    assert [(c.worker, c.held) for c in world.claims[owner]] == [(world.worker["id"], True)]
    assert holder_status(world.ledger(world.worker["id"]), world.worker["id"])["id"] == owner

    # the owner dies: once the ledger says so, the other server claims the worker and re-plans
    with world.lock:
        world.states[owner] = "dead"
    notify([other_ref], "ledger_changed")
    other_box = box_b if owner == a else box_a
    wait_for(lambda: uses_worker(other_box), 5, what="the survivor to take the worker over")
    assert other_ref.proxy().status().get(timeout=5)["taken"] == []
    time.sleep(0.2)  # its claim has reached the others
    assert holder_status(world.ledger(world.worker["id"]), world.worker["id"])["id"] == other


def test_without_local_layers_a_server_with_no_free_worker_says_why(actors):
    world = World(["a" * 16, "b" * 16])
    a, b = world.states
    world.claims[a] = [wire.Claim(worker=world.worker["id"], since=1.0, held=True)]
    box = PlanBox()
    ref = SharderActor.start(box, FakeGateway(), FakeSupervisor(), world.ledger(b), lambda remote: FakeEntry(),
                             None, None, 0.0, None, None, b, 0.3)
    actors.append(ref)
    world.sharders[b] = ref
    ref.proxy().initial_plan().get(timeout=5)
    notify([ref], "ledger_changed")
    status = wait_for(lambda: (s := ref.proxy().status().get(timeout=5))["taken"] and "no free worker" in s["error"]
                      and s, 5, what="the reason in status")
    assert box.plan is None and "in use by server" in status["error"] and world.claims[b] == []


# --- what the Swarm page shows (no socket, then headless Chromium) ---

def claimed_cluster():
    from swarm_fakes import FakeCluster, peer

    worker, other, free = peer(1, "worker"), peer(2, "server"), peer(3, "worker")
    other["claims"] = [{"worker": worker["id"], "since": 1.7e9, "held": True}]
    shard = {"workers": [], "local_layers": 30, "n_layers": 30, "reshards": 0, "error": "", "pending": False,
             "taken": [{"id": worker["id"], "name": worker["name"], "by": other["id"], "by_name": other["name"]}],
             "note": "worker-01 is in use by server server-02: the model runs on this node alone"}
    return FakeCluster([worker, other, free], shard=shard), worker, other, free


def test_the_view_says_which_server_each_worker_serves():
    from zswarm.http.cluster import cluster_view

    fake, worker, other, free = claimed_cluster()
    view = cluster_view(fake.snapshot())
    by_id = {n["id"]: n for n in view["workers"]}
    assert by_id[worker["id"]]["held_by"] == {"id": other["id"], "name": "server-02", "self": False, "held": True}
    assert by_id[free["id"]]["held_by"] is None
    assert view["servers"][0]["held_by"] is None
    assert view["taken"] == [{"id": worker["id"], "name": "worker-01", "by": other["id"], "by_name": "server-02"}]
    assert view["shard_note"].endswith("the model runs on this node alone")
    # a holder the ledger declares dead holds nothing
    fake.peers[1]["state"] = "dead"
    assert {n["id"]: n["held_by"] for n in cluster_view(fake.snapshot())["workers"]}[worker["id"]] is None


def test_the_page_shows_who_holds_a_worker(browser):  # noqa: F811 (fixture)
    from swarm_fakes import FakeBackend, new_page, serve_wsgi
    from zswarm.http import create_app

    fake, worker, other, free = claimed_cluster()
    with serve_wsgi(create_app(FakeBackend(), node_name="entry", cluster=fake)) as url:
        page = new_page(browser, url)
        page.goto(url + "/swarm")
        page.wait_for_selector(f'tr[data-node-id="{worker["id"]}"] .by', timeout=5000)
        assert page.locator("#rows tr").count() == 4
        tag = page.locator(f'tr[data-node-id="{worker["id"]}"] .by')
        assert tag.text_content() == "serves server-02"
        assert page.locator(f'tr[data-node-id="{free["id"]}"] .by').count() == 0
        note = page.locator("#split-taken")
        assert note.is_visible() and note.text_content() == (
            "worker-01 is in use by server server-02: the model runs on this node alone. "
            "A worker serves one server's split at a time.")
        heights = page.eval_on_selector_all("#rows tr", "trs => trs.map(tr => tr.getBoundingClientRect().height)")
        assert max(heights) < 40, heights
        assert page.script_errors == []
        page.context.close()


# --- the chaos scenario: real processes ---

SERVER = ["--p2p", "--threads", "1", "--reshard-settle", "1", "--parallel", "1"]


def client(node):
    url = node.args[node.args.index("--address") + 1]
    return openai.OpenAI(base_url=f"http://{url}/v1", api_key="x", max_retries=0, timeout=120)


def ask(node):
    out = client(node).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               temperature=0, max_tokens=4)
    return out.choices[0].message.content


def settled(server, with_worker):
    """Ready, nothing pending, and the plan uses the worker (its layers reported) or not."""
    st = server.admin("status")
    s = st.get("shard") or {}
    return (child_state(st, "engine") == "ready" and not s.get("pending") and not s.get("settling")
            and bool(s.get("workers")) == with_worker and (s.get("n_layers", 0) > 0 or not with_worker))


@pytest.mark.slow
def test_two_servers_and_one_worker(tmp_path):
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        w = c.node("w1", "worker", extra=["--mem", "1GiB", "--threads", "1"])
        s1 = c.node("s1", "server", bootstrap=[w], extra=SERVER)
        s2 = c.node("s2", "server", bootstrap=[w], extra=SERVER)  # the join command, run twice
        ids = {s1.node_id(): s1, s2.node_id(): s2}
        wid = w.node_id()
        t0 = time.monotonic()
        # both become ready: exactly one splits the model over the worker, the other runs alone
        wait_for(lambda: sum(settled(s, True) for s in ids.values()) == 1
                 and sum(settled(s, False) for s in ids.values()) == 1, 120, 0.3,
                 what="one server split over the worker and one running alone")
        ready_s = time.monotonic() - t0
        owner = next(s for s in ids.values() if settled(s, True))
        other = s2 if owner is s1 else s1
        owner_id = owner.node_id()
        assert [x["id"] for x in shard(owner)["workers"]] == [wid] and shard(owner)["taken"] == []
        taken = shard(other)["taken"]
        assert taken == [{"id": wid, "name": "w1", "by": owner_id, "by_name": owner.name}], taken
        assert "in use by server" in shard(other)["note"] and "alone" in shard(other)["note"]
        held = w.admin("status")["rpc"]["held_by"]
        assert held["id"] == owner_id and held["name"] == owner.name and held["held"]
        # the log says it too: "in use by server s1", or "claimed by server s1 first" after a race
        assert f"worker w1 ({wid[:8]})" in other.log() and f"by server {owner.name} (" in other.log()
        # the Swarm page's data: the worker serves the owner, and the other lists it as taken
        url = "http://" + other.args[other.args.index("--address") + 1] + "/api/p2p"
        view = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert view["workers"][0]["held_by"]["id"] == owner_id and view["taken"][0]["by"] == owner_id
        assert ask(owner) and ask(other)

        # the owner stops: its claim goes with it, and the other server takes the worker over,
        # under steady load (streamed and not): a join drains the engine, so nothing is lost
        before = shard(other)["reshards"]
        done = threading.Event()
        results = []

        def load():
            while not done.is_set():
                try:
                    results.append(("whole", ask(other)))
                    stream = client(other).chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True)
                    results.append(("stream", "".join(ch.choices[0].delta.content or "" for ch in stream
                                                      if ch.choices)))
                except openai.APIError as e:
                    results.append(("failed", repr(e)))
        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        owner.signal(signal.SIGTERM)
        owner.wait(10)
        t1 = time.monotonic()
        wait_for(lambda: settled(other, True) and shard(other)["reshards"] > before, 90, 0.3,
                 what="the other server to re-shard onto the freed worker")
        takeover_s = time.monotonic() - t1
        time.sleep(1.0)  # a request or two on the new split
        done.set()
        loader.join(130)
        assert [x["id"] for x in shard(other)["workers"]] == [wid] and shard(other)["taken"] == []
        assert results and all(kind != "failed" for kind, _ in results), results
        wait_for(lambda: (w.admin("status")["rpc"]["held_by"] or {}).get("id") == other.node_id(), 10, 0.2,
                 what="the worker to say which server it serves now")
        assert ask(other)
        print(f"both ready in {ready_s:.1f} s; take-over after the owner stopped: {takeover_s:.1f} s; "
              f"{len(results)} requests meanwhile, none lost")
    finally:
        c.close()
