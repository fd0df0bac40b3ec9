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
tokens; ``X-Zswarm-Timeout`` is at least 60 s, so a generated timeout of a microsecond does not
turn a case into a 504. Only positive cases run there; the negative ones run in process, where
they are cheap.

The request bodies are generated from the Structs the app decodes with (see openapi.py); the
tests here hold the document to them: every field of every Struct is there, and the schemas
are exactly what generation gives.
"""

from __future__ import annotations

import collections
import copy
import json
import urllib.request

import falcon.inspect
import falcon.testing
import hypothesis
import msgspec
import msgspec.inspect
import pytest
import schemathesis
from schemathesis import GenerationMode

from cluster import Cluster, wait_for
from swarm_fakes import MODEL, FakeBackend, FakeCluster, fifty_peers, shard_of
from zswarm import config
from zswarm.http import app as http_app, create_app
from zswarm.http.openapi import DOCUMENT, TIMEOUT_HEADER
from zswarm.http.schema import REQUESTS
from zswarm.token import Token

CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance"]


def checks() -> list:
    return [getattr(schemathesis.checks, name) for name in CHECKS]


def make_app(keys=(), backend=None):
    peers = fifty_peers()[:8]  # every role and state, and a split model
    fake = FakeCluster(peers, shard=shard_of(peers))
    return create_app(backend or FakeBackend(), api_keys=keys, node_name="entry", cluster=fake)


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


SCHEMAS = DOCUMENT["components"]["schemas"]
BODIES = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def structs(t: msgspec.inspect.Type, found: dict) -> dict:
    """Every Struct reachable from the type ``t`` (by class), with its fields."""
    if isinstance(t, msgspec.inspect.StructType):
        if t.cls in found:
            return found
        found[t.cls] = t
        inner = [f.type for f in t.fields]
    else:  # Metadata, Union, list, dict...: whatever holds other types
        inner = [getattr(t, a) for a in ("type", "item_type", "key_type", "value_type") if hasattr(t, a)]
        inner += [*getattr(t, "types", ()), *getattr(t, "item_types", ())]
    for i in inner:
        structs(i, found)
    return found


def request_structs() -> dict:
    found: dict = {}
    for t in REQUESTS.values():
        structs(msgspec.inspect.type_info(t), found)
    return found


def test_each_body_is_the_struct_the_app_decodes():
    for kind, path in BODIES.items():
        body = DOCUMENT["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{REQUESTS[kind].__name__}"}


def test_every_struct_field_is_documented():
    found = request_structs()
    assert {c.__name__ for c in found} >= {"ChatRequest", "CompletionRequest", "Message", "ContentPart",
                                           "StreamOptions"}
    for cls, info in found.items():
        documented = SCHEMAS[cls.__name__]
        tag = {info.tag_field} if info.tag_field else set()  # a tagged union's "type"
        assert set(documented["properties"]) == {f.encode_name for f in info.fields} | tag, cls.__name__
        assert set(documented["required"]) == {f.encode_name for f in info.fields if f.required} | tag, cls.__name__
        assert documented.get("additionalProperties", True) is True, "unknown fields are accepted"
    # what the hand-written document said, now said by the Structs
    chat = SCHEMAS["ChatRequest"]
    description = " ".join(chat["description"].split())  # a docstring's line breaks are soft in Markdown
    assert "accepted and ignored" in description and "4.0 is not an integer" in description
    assert chat["properties"]["messages"]["minItems"] == 1
    assert chat["properties"]["n"]["anyOf"] == [{"enum": [1]}, {"type": "null"}]
    assert SCHEMAS["ContentPart"]["properties"]["type"]["enum"] == ["text"]
    one_string = SCHEMAS["CompletionRequest"]["properties"]["prompt"]["anyOf"][1]
    assert (one_string["minItems"], one_string["maxItems"]) == (1, 1)


def test_request_schemas_are_what_generation_gives():
    """No drift possible: the served schemas are msgspec's own, untouched."""
    _, generated = msgspec.json.schema_components(list(REQUESTS.values()),
                                                  ref_template="#/components/schemas/{name}")
    served = falcon.testing.TestClient(make_app()).simulate_get("/openapi.json").json["components"]["schemas"]
    assert {name: served[name] for name in generated} == json.loads(json.dumps(generated))
    assert set(generated) == {c.__name__ for c in request_structs()}


def test_the_timeout_header_is_the_one_the_app_reads():
    assert TIMEOUT_HEADER == http_app.TIMEOUT_HEADER
    for path in BODIES.values():
        (param,) = DOCUMENT["paths"][path]["post"]["parameters"]
        assert param["name"] == TIMEOUT_HEADER and param["in"] == "header" and not param["required"]
        assert param["schema"] == {"type": "number", "exclusiveMinimum": 0,
                                   "maximum": config.MAX_REQUEST_TIMEOUT_S}
        assert f"{config.DEFAULT_REQUEST_TIMEOUT_S:g} s" in param["description"]


def test_a_node_that_is_down_answers_as_documented():
    """Every 503 of the OpenAI routes carries the Retry-After the document requires."""
    app = make_app(backend=FakeBackend(down=True))
    for path in ("/v1/models", "/v1/models/{model_id}", *BODIES.values()):
        (op,) = DOCUMENT["paths"][path].values()
        assert op["responses"]["503"]["headers"]["Retry-After"]["required"] is True
    r = falcon.testing.TestClient(app).simulate_post(BODIES["completion"], json={"model": MODEL, "prompt": "x"})
    assert (r.status_code, r.headers["Retry-After"]) == (503, "1")
    doc = schemathesis.openapi.from_dict(DOCUMENT)
    doc.app = app
    statuses: collections.Counter = collections.Counter()

    def call(case):  # a 5xx is right here; the rest holds, the 503's Retry-After included
        r = case.call_and_validate(checks=[c for c in checks() if c is not schemathesis.checks.not_a_server_error])
        statuses[r.status_code] += 1

    run(doc, GenerationMode.POSITIVE, 10, call)
    assert statuses[503] >= 10


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
    for name in (t.__name__ for t in REQUESTS.values()):
        props = schemas[name]["properties"]
        props["model"] = {"const": MODEL}
        if max_tokens is not None:
            props["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": max_tokens}
            schemas[name]["required"] = [*schemas[name]["required"], "max_tokens"]
            if "max_completion_tokens" in props:
                props["max_completion_tokens"] = {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 1,
                                                                               "maximum": max_tokens}]}
    if max_tokens is not None:
        for path in BODIES.values():
            (timeout,) = doc["paths"][path]["post"]["parameters"]
            timeout["schema"] = {**timeout["schema"], "minimum": 60}
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
