"""/openapi.json describes the whole HTTP API, and the API keeps to it.

schemathesis reads the document and sends generated requests, valid ones (positive) and ones
that break the schema (negative), checking every answer: never a 5xx, a status the document
lists, a documented content type, and a body that fits the documented schema. It runs against
the app in process (scripted node: fast, many cases) and, marked slow, against a real node
serving the real model.

What the real-node run changes in the document it tests, and why (the served document stays
as it is): ``model`` is pinned to the served model, so generation is reached instead of a 404
every time; ``max_tokens`` is required and capped at 4 and ``max_completion_tokens`` capped the
same, so each generated request costs a fraction of a second instead of a full context of
tokens. Only positive cases run there; the negative ones run in process, where they are cheap.
"""

from __future__ import annotations

import collections
import copy
import json
import urllib.request

import falcon.inspect
import falcon.testing
import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode

from cluster import Cluster, wait_for
from swarm_fakes import MODEL, FakeBackend, FakeCluster, fifty_peers, shard_of
from zswarm.http import create_app
from zswarm.http.openapi import DOCUMENT
from zswarm.token import Token

CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance"]


def checks() -> list:
    return [getattr(schemathesis.checks, name) for name in CHECKS]


def make_app(keys=()):
    peers = fifty_peers()[:8]  # every role and state, and a split model
    fake = FakeCluster(peers, shard=shard_of(peers))
    return create_app(FakeBackend(), api_keys=keys, node_name="entry", cluster=fake)


def test_every_route_is_documented_and_nothing_else():
    app = make_app()
    routes = {}
    for route in falcon.inspect.inspect_routes(app):
        methods = {m.method.lower() for m in route.methods if m.internal is False}
        routes[route.path] = methods
    documented = {path: set(ops) for path, ops in DOCUMENT["paths"].items()}
    assert routes == documented


def test_document_is_served_and_valid():
    r = falcon.testing.TestClient(make_app(keys=["k"])).simulate_get("/openapi.json")  # public, even with keys
    assert r.status_code == 200
    assert r.json == json.loads(json.dumps(DOCUMENT))
    schema = schemathesis.openapi.from_dict(r.json)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) == sum(len(v) for v in DOCUMENT["paths"].values())


def run(schema, mode: GenerationMode, max_examples: int, call) -> int:
    """Every operation, ``max_examples`` cases each; returns how many cases ran."""
    count = 0
    for result in schema.get_all_operations():
        op = result.ok()

        @hypothesis.settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        def one(case):
            nonlocal count
            count += 1
            call(case)

        try:
            one()
        except hypothesis.errors.Unsatisfiable:
            # negative mode: an operation without a body may have nothing that can be sent "wrong"
            # (a string path parameter accepts every string)
            assert mode is GenerationMode.NEGATIVE and not op.body, op.label
    return count


@pytest.mark.parametrize("mode, keys, examples", [
    (GenerationMode.POSITIVE, (), 50), (GenerationMode.NEGATIVE, (), 40),
    (GenerationMode.POSITIVE, ("k",), 15), (GenerationMode.NEGATIVE, ("k",), 15)],
    ids=["positive", "negative", "keys-positive", "keys-negative"])
def test_schemathesis_in_process(mode, keys, examples):
    """Without a key where keys are set, every guarded route must answer its documented 401."""
    app = make_app(keys)
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    pinned = schemathesis.openapi.from_dict(pinned_document(max_tokens=None))
    pinned.app = app
    for s in (schema, pinned):
        n = run(s, mode, examples, lambda case: case.call_and_validate(checks=checks()))
        assert n > 2 * examples


def pinned_document(max_tokens: int | None = 4) -> dict:
    """The document with ``model`` pinned to the served model and, optionally, max_tokens capped."""
    doc = copy.deepcopy(DOCUMENT)
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"const": MODEL}
        if max_tokens is not None:
            props["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": max_tokens}
            schemas[name]["required"] = [*schemas[name]["required"], "max_tokens"]
            if "max_completion_tokens" in props:
                props["max_completion_tokens"] = {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 1,
                                                                               "maximum": max_tokens}]}
    for param in doc["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
        param["schema"] = {"const": MODEL}
    return doc


@pytest.mark.slow
def test_schemathesis_against_a_real_node(tmp_path):
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        s1 = c.node("s1", "server", extra=["--p2p", "--federated", "--threads", "1", "--ctx-size", "512"])
        # a second node so /api/p2p has peers; a model-less entry point, because a worker would make
        # s1 re-split its model mid-run, and the 503s of an engine restarting are right but not tested here
        c.node("f1", "federated", bootstrap=[s1])
        wait_for(lambda: s1.admin("status")["gateway"]["routes"], 90, 0.2, what="the engine")
        wait_for(lambda: "f1" in s1.alive_peer_names(), 20, 0.1, what="s1 to know f1")
        url = f"http://{s1.args[s1.args.index('--address') + 1]}"
        wait_for(lambda: _status(url + "/readyz") == 200, 30, 0.2, what="the API")
        served = json.loads(urllib.request.urlopen(url + "/openapi.json", timeout=10).read())
        assert served == json.loads(json.dumps(DOCUMENT))
        statuses: collections.Counter = collections.Counter()

        def call(case):
            r = case.call_and_validate(base_url=url, checks=checks(), timeout=60)
            statuses[(case.operation.label, r.status_code)] += 1

        for doc, examples in ((served, 30), (pinned_document(4), 50)):
            n = run(schemathesis.openapi.from_dict(doc), GenerationMode.POSITIVE, examples, call)
            assert n > 100
        print(sorted(statuses.items()))
        # generation was reached, streamed and whole, not only refused
        assert statuses[("POST /v1/chat/completions", 200)] >= 10 and statuses[("POST /v1/completions", 200)] >= 10
        # the node is still well and serving
        assert _status(url + "/readyz") == 200
        assert s1.admin("status")["children"]["engine"]["restarts"] == 0
    finally:
        c.close()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0
