"""Issue 13's revocation: `zswarm admin revoke NODE_ID` removes a machine everywhere, for good,
and moves the cluster to a new token that reaches every remaining member over its own links.
Real node processes on 127.0.0.1; the operator runs the real `zswarm admin` command."""

import base64
import concurrent.futures
import signal
import subprocess
import sys
import threading
import time

import msgspec
import openai
import pytest
import zmq

from cluster import REPO, Cluster, shard, split_is, wait_for
from forger import Forger
from swarm_fakes import browser, new_page  # noqa: F401 (fixture)
from zswarm import rotation, wire
from zswarm.admin_client import AdminFailed
from zswarm.operator import OperatorKey
from zswarm.token import Token

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Write the numbers from one to five."}]
SERVER = ["--p2p", "--threads", "1", "--reshard-settle", "1"]
GONE_WITHIN_S = 5.0  # the issue: within 5 s no node lists it
STAY_OUT_S = 6.0  # how long a refused node is watched trying to get back in (3 suspect periods)


@pytest.fixture
def operator(tmp_path):
    key = OperatorKey.generate()
    path = key.save(tmp_path / "operator.key")
    return key, path, Token.generate((), key.public).encode()


def admin_cli(node, *args, key_path=None):
    cmd = [sys.executable, "-m", "zswarm", "admin", "--state-dir", str(node.state_dir), *args]
    if key_path is not None:
        cmd += ["--operator-key", str(key_path)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=30)


def listed(node):
    return {p["name"] for p in node.peers()}


def counter(node, name):
    return node.admin("status")["counters"].get(name, 0)


def restart(node, token=None):
    node.signal(signal.SIGTERM)
    node.wait(15)
    if token is not None:
        node.args[node.args.index("--token") + 1] = token
    node.start()
    node.node_id()  # answers again


def never(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not predicate(), what
        time.sleep(0.2)


def test_revoked_node_stays_out_and_the_rest_move_to_the_new_token(tmp_path, operator):
    key, key_path, token = operator
    c = Cluster(tmp_path, token)
    try:
        v = c.node("v", "worker")
        w = c.node("w", "worker", bootstrap=[v])
        e = c.node("e", "worker", bootstrap=[v])
        wait_for(lambda: listed(v) == {"w", "e"} and listed(e) == {"v", "w"} and listed(w) == {"v", "e"}, 30,
                 what="three workers to know each other")
        wid = w.node_id()

        # A member without the operator key cannot revoke: not with the command, not with a
        # statement of its own making handed to a node, not with one sent as gossip.
        mallory = OperatorKey.generate()
        mallory_path = mallory.save(tmp_path / "mallory.key")
        r = admin_cli(e, "revoke", v.node_id(), key_path=mallory_path)
        assert r.returncode == 1 and "not this cluster's operator key" in r.stderr and "Traceback" not in r.stderr
        info = e.admin("rotation_info")
        members = [rotation.Member(m["id"], m["curve"]) for m in info["members"]]
        forged, _ = rotation.make(key, Token.parse(token), members, [], [], 0, time.time())
        forged.sig = mallory.sign(wire.rotation_statement(forged))
        with pytest.raises(AdminFailed, match="not signed by the cluster's operator"):
            e.admin("rotate", statement=base64.b64encode(msgspec.msgpack.encode(forged)).decode())
        with Forger(token, [f"tcp://{n.endpoint}" for n in (v, e)]) as f:
            f.open()
            f.barrage([(f.node_id, forged)], rounds=3, over_s=1.0)
            wait_for(lambda: counter(v, "rotation_refused") > 0, 10, what="v to refuse the forged rotation")
        assert v.admin("token") == token and e.admin("token") == token
        assert listed(v) >= {"w", "e"}

        # The operator revokes w.
        t0 = time.monotonic()
        r = admin_cli(v, "revoke", wid, key_path=key_path)
        assert r.returncode == 0, r.stderr
        assert f"revoked {wid}" in r.stdout and "sealed to 2 member(s)" in r.stdout
        wait_for(lambda: "w" not in listed(v) and "w" not in listed(e), GONE_WITHIN_S,
                 what="w gone from every node")
        new = v.admin("token")
        assert new != token and e.admin("token") == new and Token.parse(new).operator == key.public
        wait_for(lambda: {p["name"]: p["state"] for p in e.peers()} == {"v": "alive"}
                 and {p["name"]: p["state"] for p in v.peers()} == {"e": "alive"}, 10,
                 what="v and e to carry on, on the new token")
        assert time.monotonic() - t0 < 15
        assert [x["id"] for x in v.admin("revoked")] == [wid] and [x["id"] for x in e.admin("revoked")] == [wid]
        assert "revoked this node" in w.log()

        # A member restarted with the old token (its env file still holds it) resumes with the new one.
        restart(e)
        assert "replaced by a rotation" in e.log() and new not in e.log()
        wait_for(lambda: e.admin("token") == new and listed(e) == {"v"}
                 and {p["name"]: p["state"] for p in v.peers()}.get("e") == "alive", 20,
                 what="e back in the cluster after a restart with the old token")

        # The revoked node cannot come back: not with the old token, not with the new one and its old key.
        restart(w)
        never(lambda: "w" in listed(v) or "w" in listed(e), STAY_OUT_S, "w back with the old token")
        refused = counter(v, "auth_revoked") + counter(v, "gossip_revoked")
        restart(w, token=new)
        never(lambda: "w" in listed(v) or "w" in listed(e), STAY_OUT_S, "w back with the new token")
        assert counter(v, "auth_revoked") + counter(v, "gossip_revoked") > refused
        assert not any(p["state"] == "alive" for p in w.peers())

        # A new machine joins with the new token, and learns who is revoked.
        n = c.node("n", "worker", bootstrap=[e], token=new)
        wait_for(lambda: listed(n) == {"v", "e"} and "n" in listed(v), 20, what="a newcomer with the new token")
        wait_for(lambda: [x["id"] for x in n.admin("revoked")] == [wid], 10, what="the newcomer to learn the revoked")
        # and the old token admits nobody new
        old = c.node("old", "worker", bootstrap=[v], token=token)
        never(lambda: "old" in listed(v) or "old" in listed(e), STAY_OUT_S, "a newcomer with the old token")
        assert not any(p["state"] == "alive" for p in old.peers())
    finally:
        c.close()


def test_a_member_cut_off_during_the_rotation_gets_the_new_token_when_it_is_back(tmp_path, operator):
    """The statement is flooded once; a member whose links were down just then gets it from the
    old token's links, which every node keeps for a grace period (ledger.ROTATION_GRACE_S). The
    machine revoked is off: that works too."""
    _, key_path, token = operator
    c = Cluster(tmp_path, token)
    try:
        v = c.node("v", "worker")
        w = c.node("w", "worker", bootstrap=[v])
        e = c.node("e", "worker", bootstrap=[v])
        wait_for(lambda: listed(v) == {"w", "e"} and listed(e) == {"v", "w"}, 30, what="three workers")
        wid = w.node_id()
        w.signal(signal.SIGKILL)  # a lost laptop that is off (it would pass the statement on to e)
        w.wait(5)
        e.signal(signal.SIGSTOP)  # frozen past the links' heartbeat timeout (4.5 s): they drop
        try:
            time.sleep(6)
            r = admin_cli(v, "revoke", wid, key_path=key_path)  # flooded while e has no link
            assert r.returncode == 0, r.stderr
            time.sleep(3)  # v has moved to the new token meanwhile
        finally:
            e.signal(signal.SIGCONT)
        new = v.admin("token")
        assert new != token
        wait_for(lambda: e.admin("token") == new, 20, what="e to get the new token after it was back")
        wait_for(lambda: {p["name"]: p["state"] for p in e.peers()} == {"v": "alive"}
                 and {p["name"]: p["state"] for p in v.peers()}.get("e") == "alive", 20,
                 what="e and v together on the new token")
    finally:
        c.close()


def client(node):
    url = node.args[node.args.index("--address") + 1]
    return openai.OpenAI(base_url=f"http://{url}/v1", api_key="x", max_retries=0, timeout=120)


def test_revoking_a_worker_under_load(tmp_path, operator, browser):
    _, key_path, token = operator
    c = Cluster(tmp_path, token)
    try:
        w1 = c.node("w1", "worker", extra=["--mem", "2GiB", "--threads", "1"])
        w2 = c.node("w2", "worker", bootstrap=[w1], extra=["--mem", "2GiB", "--threads", "1"])
        s = c.node("s", "server", bootstrap=[w1], extra=SERVER + ["--no-local-layers"])
        wait_for(lambda: split_is(s, ["w1", "w2"]), 90, 0.2, what="the split over two workers")
        w2id = w2.node_id()

        def ask():
            out = client(s).chat.completions.create(model=MODEL, messages=PROMPT, temperature=0, max_tokens=16)
            return out.choices[0].message.content

        stop = threading.Event()

        def load():
            out = []  # (finished at, "ok" or the HTTP status)
            while not stop.is_set():
                try:
                    ask()
                    out.append((time.monotonic(), "ok"))
                except openai.APIStatusError as e:  # a clean failure: an HTTP error with a body
                    out.append((time.monotonic(), e.status_code))
            return out

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            running = [pool.submit(load) for _ in range(3)]
            time.sleep(1.0)
            r = admin_cli(s, "revoke", "w2", key_path=key_path)  # by name works too
            assert r.returncode == 0, r.stderr
            t0 = time.monotonic()
            wait_for(lambda: "w2" not in listed(s) and "w2" not in listed(w1), GONE_WITHIN_S, 0.1,
                     what="w2 gone from every node")
            wait_for(lambda: w2id not in {w["id"] for w in shard(s)["workers"]} or shard(s)["pending"],
                     GONE_WITHIN_S - (time.monotonic() - t0), 0.1, what="the split to stop planning with w2")
            wait_for(lambda: split_is(s, ["w1"]), 60, 0.2, what="the split on w1 alone")
            time.sleep(2.0)
            stop.set()
            results = [x for f in running for x in f.result(timeout=300)]
        # every request was answered or failed cleanly, and the server went on answering after it
        assert all(x[1] == "ok" or 500 <= x[1] < 600 for x in results), results
        after = [x for x in results if x[0] > t0]
        assert sum(x[1] == "ok" for x in after) >= 3, results
        assert ask() and s.running() and w1.running()
        new = s.admin("token")
        assert new != token and new == w1.admin("token")

        # the Swarm page lists the revoked worker, and its token card has the new token
        url = "http://" + s.args[s.args.index("--address") + 1]
        page = new_page(browser, url)
        page.goto(url + "/swarm")
        page.wait_for_selector("#revoked-card:not([hidden])", timeout=5000)
        assert "w2" in page.text_content("#revoked") and w2id in page.text_content("#revoked")
        page.click("#copy-token")
        page.wait_for_selector("#copy-token.done", timeout=2000)
        assert page.evaluate("navigator.clipboard.readText()") == new
        assert page.script_errors == []
        page.context.close()
    finally:
        c.close()


def test_a_revoked_entry_point_is_refused_on_the_link_it_already_had(tmp_path, operator):
    """ZAP refuses a revoked key at its next handshake; a link made before the revocation stays
    up, so the gateway checks every request's key too."""
    from zswarm.identity import Identity

    _, key_path, token = operator
    c = Cluster(tmp_path, token)
    try:
        (c.tmp / "s").mkdir(mode=0o700)
        s_id = Identity.load_or_create(c.tmp / "s").node_id  # made before the node starts, to target it
        s = c.node("s", "server", extra=["--p2p", "--federated", "--threads", "1"])
        m = c.node("m", "federated", bootstrap=[s], extra=["--target-node", s_id])
        wait_for(lambda: any(MODEL in r["models"] for r in m.admin("status")["gateway"]["routes"]), 90, 0.2,
                 what="m to route to s")
        assert client(m).chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4).choices
        refused = counter(s, "gateway_not_member")
        own = {r["id"]: r for r in s.admin("ledger")}[s_id]
        r = admin_cli(s, "revoke", "m", key_path=key_path)
        assert r.returncode == 0, r.stderr
        with pytest.raises(openai.APIStatusError) as e:  # m still has its link to s's gateway
            openai.OpenAI(base_url=client(m).base_url, api_key="x", max_retries=0, timeout=60).chat.completions.create(
                model=MODEL, messages=PROMPT, max_tokens=4)
        assert 500 <= e.value.status_code < 600
        assert counter(s, "gateway_not_member") > refused
        assert s.running() and "m" not in listed(s)

        # m saw s's gateway key while it was a member: with a fresh key of its own (ZAP admits any
        # key it has not been told to refuse) it gets a handshake, but no answer
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.curve_publickey, dealer.curve_secretkey = zmq.curve_keypair()
        dealer.curve_serverkey = own["curve"].encode()
        try:
            dealer.connect(own["endpoints"]["gateway"])
            dealer.send(wire.encode_inference("0" * 16, wire.GenRequest(
                id="ab" * 8, kind="chat", model=MODEL, messages=[wire.ChatMessage("user", "Hi")], max_tokens=4)))
            assert dealer.poll(10_000), "no answer at all"
            reply = wire.decode_inference(dealer.recv()).body
            assert isinstance(reply, wire.Fail) and reply.code == "no_node", reply
        finally:
            dealer.close(0)
            ctx.term()
    finally:
        c.close()
