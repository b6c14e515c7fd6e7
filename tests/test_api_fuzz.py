"""A property-based fuzz of the OpenAI API: a few hundred requests generated
over the request schema (known fields with hostile values, unknown fields,
wrong types, lone surrogates, huge and non-finite numbers, bodies that are
not JSON at all) against a live `kvtier serve`. Every answer is a 2xx or an
OpenAI-style 4xx; the server never answers 5xx, never logs a traceback, and
still serves afterwards."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import servers

API_KEY = "fuzz-key"
MODEL = "fuzz-model"

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p",
          "top_k", "seed", "stop", "stop_token_ids", "min_tokens", "ignore_eos", "logprobs", "top_logprobs",
          "stream", "stream_options", "cache_salt", "user", "echo", "best_of", "presence_penalty",
          "include_stop_str_in_output", "skip_special_tokens", "logit_bias", "suffix", "priority"]

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.one_of(st.text(max_size=30), st.text(alphabet=st.one_of(st.characters(), surrogates), max_size=10),
                  st.sampled_from(["", MODEL, "Hello", "\x00", "<|im_end|>"]))
numbers = st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.integers(-3, 40), st.floats(allow_nan=True),
                    st.sampled_from([0, 1, -1, 2 ** 63, 2 ** 64, 1e308, -0.0]))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(texts, inner, max_size=3)), max_leaves=8)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "bot", 5]),
     "content": st.one_of(texts, st.none(), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                                                     max_size=2), values)}), max_size=3)
field_values = {
    "prompt": st.one_of(texts, st.lists(st.integers(-5, 60000), max_size=6), st.lists(texts, max_size=2), values),
    "messages": st.one_of(messages, values),
    "max_tokens": st.one_of(st.integers(-2, 4), numbers, values),
    "n": st.one_of(st.integers(0, 3), numbers),
}


@st.composite
def bodies(draw):
    body = {}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=8, unique=True)):
        body[name] = draw(field_values.get(name, values))
    if draw(st.booleans()):
        body.update(draw(st.dictionaries(texts, values, max_size=2)))
    return body


@st.composite
def nearly_valid(draw):
    """A request that would run, but for one or two hostile fields: what reaches sampling and the engine."""
    chat = draw(st.booleans())
    body = {"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hello there"}
    body["max_tokens"] = 2
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2, unique=True)):
        body[name] = draw(field_values.get(name, values))
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


hostile_text = st.builds(lambda a, bad, b: a + bad + b, st.text(max_size=5),
                         st.one_of(surrogates, st.sampled_from(["\x00", "\ufffe", "\U0010ffff"])),
                         st.text(max_size=5))


@st.composite
def poisoned_strings(draw):
    """A request that would run, with one string made of what no encoder takes."""
    bad = draw(hostile_text)
    where = draw(st.sampled_from(["prompt", "model", "cache_salt", "user", "stop", "content", "name"]))
    if where in ("content", "name"):
        message = {"role": "user", "content": "Hi"}
        message[where] = bad
        return "/v1/chat/completions", {"messages": [message], "max_tokens": 2}
    body = {"prompt": "x" * draw(st.sampled_from([1, 40])), "max_tokens": 2}
    body[where] = [bad] if where == "stop" else bad
    return "/v1/completions", body


requests = st.one_of(
    nearly_valid(), nearly_valid(), poisoned_strings(),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), bodies()),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), values),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models"]), st.binary(max_size=64)),
)


@pytest.fixture(scope="module")
def server():
    with servers.kvtier_serving("--api-key", API_KEY, "--served-model-name", MODEL, "--max-model-len", "96",
                                "--num-gpu-blocks-override", "48", "--max-num-seqs", "8") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=requests)
def test_no_request_gets_a_5xx(http, request):
    path, body = request
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (path, content[:300], r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) >= {"message", "type"} and error["message"]
    elif not (isinstance(body, dict) and body.get("stream") is True):
        r.json()  # a 2xx that is not a stream is a JSON body


def test_the_server_still_serves(http, server):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
