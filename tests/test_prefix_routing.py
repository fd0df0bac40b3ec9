"""Prefix-affinity routing end to end: two federated servers and an entry point, the real model,
the official openai client. A conversation's turns go to the node whose engine has its prefix
cached, and spill over when that node is busier; every answer names the node that served it."""

import concurrent.futures
import json
import re
import urllib.request

import openai
import pytest

from cluster import Cluster, wait_for
from zswarm.token import Token

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
SERVER_ARGS = ["--p2p", "--federated", "--threads", "1"]
SYSTEM = ("You are the assistant of the harbour master of a small fishing town. You answer questions "
          "about tides, boats, moorings and the weather, briefly and politely. ") * 12  # ~2000 characters


def api_url(node):
    return f"http://{node.args[node.args.index('--address') + 1]}"


def client(node):
    return openai.OpenAI(base_url=api_url(node) + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("prefix"), Token.generate().encode())
    s1 = c.node("s1", "server", extra=SERVER_ARGS)
    s2 = c.node("s2", "server", bootstrap=[s1], extra=SERVER_ARGS)
    f = c.node("f", "federated", bootstrap=[s1])
    try:
        wait_for(lambda: len([r for r in f.admin("status")["gateway"]["routes"] if MODEL in r["models"]]) == 2,
                 60, 0.2, what="both servers routable from the entry point")
        yield c, s1, s2, f
    finally:
        c.close()


def turn(api, messages, max_tokens=8):
    """One streamed turn: (answer, X-Zswarm-Node, the chunks' system_fingerprint, cached prompt tokens)."""
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True})
    chunks = list(raw.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    prints = {ch.system_fingerprint for ch in chunks}
    usage = chunks[-1].usage
    return text, raw.headers["x-zswarm-node"], prints, usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens


def test_a_conversation_stays_on_the_node_that_holds_its_prefix(fed):
    _, s1, s2, f = fed
    ids = {s1.node_id(), s2.node_id()}
    api = client(f)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "When is high tide?"}]
    served, cached = [], []
    for question in ("Is the harbour open?", "Can I moor a small boat?", "What about tomorrow?"):
        text, node, prints, hit, prompt = turn(api, messages)
        assert node in ids and prints == {f"zswarm-{node}"}  # streamed, and still named truthfully
        served.append(node)
        cached.append((hit, prompt))
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": question}]
    assert len(set(served)) == 1, served
    first_hit, first_prompt = cached[0]
    for hit, prompt in cached[1:]:  # each later turn reuses most of its prompt from the engine's cache
        assert hit >= 0.8 * first_prompt and hit < prompt, cached
    routed = f.admin("status")["gateway"]["prefix_routed"]
    assert routed.get(served[0], 0) >= len(served) - 1  # the first turn had no holder yet
    # the holder announces what its engine holds, and how fast it is
    holder = s1 if served[0] == s1.node_id() else s2
    record = holder.admin("ledger")[0]
    assert record["prefixes"] and record["decode_tps"] > 0 and record["prefill_tps"] > 0
    # and /metrics counts the hits, by serving node
    text = urllib.request.urlopen(api_url(f) + "/metrics", timeout=10).read().decode()
    hits = re.search(r'zswarm_prefix_cache_hits_total\{model="%s",node="%s"\} (\d+)' % (MODEL, served[0]), text)
    assert hits and int(hits.group(1)) >= len(served) - 1, text[:2000]

    # every node's page shows the same requests served and prefix hits (each node counts its own)
    def figures(node):
        view = json.loads(urllib.request.urlopen(api_url(node) + "/api/p2p", timeout=10).read())
        return {n["id"]: (n["served"], n["prefix_hits"]) for n in view["federated"]}
    def agreed():  # the holder announces its counts at its gateway's next tick: the pages follow
        pages = [figures(n) for n in (f, s1, s2)]
        mine = pages[0][served[0]]
        return pages[0] == pages[1] == pages[2] and mine[0] >= len(served) and mine[1] >= len(served) - 1
    wait_for(agreed, 10, 0.2, what="the holder's figures, the same on every page")


def test_turns_spill_over_when_the_holder_is_busier_and_whole_answers_are_named_too(fed):
    _, s1, s2, f = fed
    api = client(f)
    messages = [{"role": "system", "content": SYSTEM.replace("fishing", "ferry")},
                {"role": "user", "content": "Hello."}]
    text, holder, _, _, _ = turn(api, messages)
    messages += [{"role": "assistant", "content": text}]
    busy = messages + [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # two long answers with the same prefix: the first runs on the holder, the second queues there
        first = pool.submit(turn, client(f), busy, 300)
        wait_for(lambda: f.admin("status")["gateway"]["per_node_in_flight"].get(holder, 0) >= 1, 30, 0.02,
                 what="the first long answer on the holder")
        second = pool.submit(turn, client(f), busy, 300)
        wait_for(lambda: f.admin("status")["gateway"]["per_node_in_flight"].get(holder, 0) >= 2, 30, 0.02,
                 what="the second long answer queued on the holder")
        _, node, prints, _, _ = turn(api, messages + [{"role": "user", "content": "Is it windy?"}])
        assert node != holder, "the holder was two requests busier, yet took the turn"
        assert prints == {f"zswarm-{node}"}
        assert {first.result()[1], second.result()[1]} == {holder}
    whole = api.chat.completions.with_raw_response.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    assert whole.parse().system_fingerprint == f"zswarm-{whole.headers['x-zswarm-node']}"
