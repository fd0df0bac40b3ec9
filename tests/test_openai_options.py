"""OpenAI options agents rely on, through the official client against a real node and model:
JSON answers constrained by a grammar, seeded sampling, and a 400 for what is not served yet."""

import json

import jsonschema
import openai
import pytest

from cluster import free_port, wait_for

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from cluster import Cluster

    tmp = tmp_path_factory.mktemp("options")
    c = Cluster(tmp, "")
    node = c.node("solo", "server", extra=["--threads", "1"], port=free_port(2))
    address = node.args[node.args.index("--address") + 1]
    client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="none", max_retries=0, timeout=120)
    try:
        wait_for(lambda: [m.id for m in client.models.list().data] == [MODEL], 60, 0.2, what="the node's API",
                 retry=(openai.APIConnectionError, openai.APIStatusError))
        yield client
    finally:
        c.close()


def ask(api, **kw):
    return api.chat.completions.create(model=MODEL, temperature=0, max_tokens=60, **kw)


def test_json_schema_answers_validate(api):
    r = ask(api, messages=[{"role": "user", "content": "Describe a sailor called Ann who is 31."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    answer = json.loads(r.choices[0].message.content)
    jsonschema.validate(answer, PERSON)
    # streamed, the same constraint holds
    stream = api.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=60, stream=True,
        messages=[{"role": "user", "content": "Describe a fisherman called Bo."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)), PERSON)


def test_json_object_answers_parse(api):
    prompt = 'Reply with a JSON object with one key, "colour", for the colour of the sky.'
    r = api.chat.completions.create(model=MODEL, temperature=0, max_tokens=120, response_format={"type": "json_object"},
                                    messages=[{"role": "user", "content": prompt}])
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content  # not cut by max_tokens
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_a_schema_no_grammar_can_follow_is_a_400(api):
    with pytest.raises(openai.BadRequestError) as e:
        ask(api, messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    assert "response_format" in str(e.value)


def test_seeded_sampling_repeats(api):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Invent a name for a boat."}], temperature=1.0,
              max_tokens=16)
    first = api.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert api.chat.completions.create(seed=1234, **kw).choices[0].message.content == first
    others = {api.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert others != {first}  # the seed decides: other seeds, other boats


def test_options_not_served_yet_are_a_400_naming_them(api):
    tool = {"type": "function", "function": {"name": "get_tide", "parameters": {"type": "object", "properties": {}}}}
    for kw, param in ((dict(tools=[tool]), "tools"), (dict(logprobs=True, top_logprobs=2), "logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            ask(api, messages=[{"role": "user", "content": "When is high tide?"}], **kw)
        assert e.value.body["param"] == param
