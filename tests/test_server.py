"""The OpenAI server end to end: a live `kvtier serve` process with the real
engine, driven by the official openai client (and httpx for bad input)."""
import time

import httpx
import openai
import pytest

API_KEY = "test-key"
MODEL = "kvtier-test"  # served under two names: this and the model's own
MAX_MODEL_LEN = 1024
MAX_REQUEST_BYTES = 4_000_000
PROMPT = "Hello, my name is"
LONG_PROMPT = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(40))


@pytest.fixture(scope="module")
def base_url():
    from servers import kvtier_serving
    # Every client mistake in this file must be a 4xx, never a crash in a handler.
    with kvtier_serving("--api-key", API_KEY, "--served-model-name", MODEL, "SmolLM2-135M-Instruct",
                        "--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks-override", "256",
                        "--max-request-bytes", str(MAX_REQUEST_BYTES)) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def check_usage(usage, completion_tokens=None):
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0
    if completion_tokens is not None:
        assert usage.completion_tokens == completion_tokens


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exposed")


# -- plumbing ----------------------------------------------------------------------

def test_health_version_and_models(http, client):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    assert [m.id for m in client.models.list().data] == [MODEL, "SmolLM2-135M-Instruct"]


def test_api_key_is_enforced_on_every_route_but_health(base_url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": "Basic x"}):
        r = httpx.post(f"{base_url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics", "/docs", "/redoc", "/openapi.json", "/version"):
        assert httpx.get(f"{base_url}{path}").status_code == 401, path
    assert httpx.get(f"{base_url}/health").status_code == 200
    # The scheme is case-insensitive, as HTTP says.
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"}).status_code == 200
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# -- completions -------------------------------------------------------------------

def test_completion(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert len(r.choices) == 1 and r.choices[0].text and r.choices[0].finish_reason == "length"
    check_usage(r.usage, completion_tokens=5)


def test_completion_streaming_assembles_to_the_same_text(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    check_usage(chunks[-1].usage, completion_tokens=6)
    assert all(c.usage is None for c in chunks[:-1])


def test_prompt_as_list_of_one_string_or_token_ids(client):
    as_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    as_list = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=3, temperature=0)
    assert as_list.choices[0].text == as_text.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=[1, 19556, 28, 957], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 3


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 2 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the most likely token


def test_stop_string_cuts_the_text_in_both_modes(client):
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    stop = free.split()[1]  # a word from the middle of the greedy continuation
    expected = free[:free.index(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_n_choices_stream_with_their_index(client):
    texts, finished = {}, set()
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, temperature=1.0,
                                           seed=1, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert set(texts) == finished == {0, 1}
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, temperature=1.0, seed=1)
    assert sorted(c.index for c in whole.choices) == [0, 1]
    assert whole.usage.completion_tokens == 8


def test_repeated_long_prompt_reports_cached_tokens(client):
    first = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 256
    assert again.usage.prompt_tokens_details.cached_tokens >= 256
    assert again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


# -- chat --------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_chat_streaming_assembles_to_the_same_message(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    check_usage(whole.usage)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=6,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_content_parts_and_repeated_prefix_cache(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": LONG_PROMPT}]}]
    client.chat.completions.create(model=MODEL, messages=parts, max_tokens=1)
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG_PROMPT}],
                                           max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token


# -- bad input ---------------------------------------------------------------------

CHAT_OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION_OK = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION_OK, "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION_OK, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION_OK, "n": 0}, 400, "n"),
    ("/v1/completions", {**COMPLETION_OK, "n": 1000}, 400, "n"),
    ("/v1/completions", {**COMPLETION_OK, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {**COMPLETION_OK, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**COMPLETION_OK, "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {**COMPLETION_OK, "stop": 5}, 400, "stop"),
    ("/v1/completions", {**COMPLETION_OK, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION_OK, "prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION_OK, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION_OK, "prompt": [10 ** 9]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION_OK, "prompt": "word " * (MAX_MODEL_LEN + 10)}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION_OK, "prompt": "word " * (MAX_MODEL_LEN + 10), "stream": True}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION_OK, "echo": True}, 400, "echo"),
    ("/v1/completions", {**COMPLETION_OK, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT_OK, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "bot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT_OK, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT_OK, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT_OK, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT_OK, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT_OK, "stream_options": {"include_usage": "maybe"}}, 400,
     "stream_options.include_usage"),
    ("/v1/chat/completions", {**CHAT_OK, "model": "gpt-4"}, 404, "model"),
    # Beyond what the engine's types can hold: each was a 500 once.
    ("/v1/completions", {**COMPLETION_OK, "seed": 2 ** 64}, 400, "seed"),
    ("/v1/completions", {**COMPLETION_OK, "seed": 2 ** 70}, 400, "seed"),
    ("/v1/completions", {**COMPLETION_OK, "seed": -2 ** 63 - 1}, 400, "seed"),
    ("/v1/chat/completions", {**CHAT_OK, "seed": 2 ** 63}, 400, "seed"),
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 1}', 400, None),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "a"}', 400, None),
    ("/v1/completions", b'{"prompt": "' + b"x" * 100 + b'", "cache_salt": "\\udfff"}', 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', 400, None),
    ("/v1/completions", {**COMPLETION_OK, "n": 65}, 400, "n"),
    ("/v1/completions", {**COMPLETION_OK, "priority": "high"}, 400, "priority"),
    ("/v1/chat/completions", {**CHAT_OK, "priority": 2 ** 64}, 400, "priority"),
])
def test_bad_input_gets_an_openai_error(http, path, body, status, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"


def test_a_body_over_the_limit_is_refused_whole(http, base_url):
    huge = {"prompt": "x" * (MAX_REQUEST_BYTES + 10), "max_tokens": 1}
    r = http.post("/v1/completions", json=huge)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"prompt": "'
        for _ in range(MAX_REQUEST_BYTES // 65536 + 2):
            yield b"y" * 65536
        yield b'"}'

    r = httpx.post(f"{base_url}/v1/completions", content=chunks(), timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413


def test_huge_prompts_are_refused_without_holding_anyone(http, client):
    """A prompt that cannot fit is refused before it is tokenized; one that must
    be tokenized to tell is tokenized off the event loop and the engine thread."""
    import concurrent.futures
    certain = "word " * (MAX_REQUEST_BYTES // 6)  # ~3.3 MB: far more bytes than 1024 tokens can stand for
    borderline = "z" * 9000  # a few thousand tokens: only the tokenizer can say
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        big = [pool.submit(http.post, "/v1/completions", json={"prompt": p, "max_tokens": 1})
               for p in (certain, borderline)]
        health = pool.submit(http.get, "/health")
        small = pool.submit(client.completions.create, model=MODEL, prompt=PROMPT, max_tokens=2)
        assert health.result().status_code == 200
        assert small.result().choices[0].text is not None
        for future in big:
            r = future.result()
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_route_is_an_openai_error(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="word " * (MAX_MODEL_LEN + 10), max_tokens=2)
    assert "context length" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)


def test_server_still_serves_after_bad_input(http, client):
    test_bad_input_gets_an_openai_error(http, "/v1/completions", b"{", 400, None)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).choices[0].text is not None


# -- disconnects and metrics ----------------------------------------------------------

def wait_until_idle(http, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while metric(http, "kvtier_requests_running") or metric(http, "kvtier_requests_waiting"):
        assert time.monotonic() < deadline, "the engine kept working for a client that left"
        time.sleep(0.2)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request(http, stream):
    long_request = {**COMPLETION_OK, "prompt": PROMPT, "max_tokens": 800, "ignore_eos": True, "stream": stream}
    before = metric(http, "kvtier_generation_tokens_total")
    try:
        with http.stream("POST", "/v1/completions", json=long_request, timeout=None if stream else 2) as r:
            next(line for line in r.iter_lines() if line.startswith("data:"))
    except httpx.ReadTimeout:  # the non-streaming client gives up
        pass
    wait_until_idle(http)
    assert metric(http, "kvtier_generation_tokens_total") - before < 800


def test_metrics_after_traffic(http, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    text = http.get("/metrics").text
    for name in ["kvtier_requests_running", "kvtier_requests_waiting", "kvtier_prompt_tokens_total",
                 "kvtier_generation_tokens_total", "kvtier_prefix_cache_queries_total",
                 "kvtier_prefix_cache_hits_total", "kvtier_num_preemptions_total",
                 "kvtier_time_to_first_token_seconds_bucket", "kvtier_time_to_first_token_seconds_count",
                 "kvtier_kv_cache_usage_ratio", "kvtier_kv_cache_group_usage_ratio{group=",
                 "kvtier_kv_tier_lookup_tokens_total", "kvtier_kv_tier_hit_tokens_total",
                 "kvtier_kv_tier_bytes_total", "kvtier_kv_tier_usage_bytes", "kvtier_kv_tier_errors_total",
                 "kvtier_kv_tier_corrupt_blocks_total", "kvtier_preemption_swapped_out_blocks_total",
                 "kvtier_preemption_swapped_in_blocks_total", "kvtier_preemption_swap_fallbacks_total",
                 "kvtier_preemption_recomputed_tokens_total", "kvtier_preemption_restore_seconds_count"]:
        assert name in text
    assert metric(http, "kvtier_prompt_tokens_total") > 0
    assert metric(http, "kvtier_generation_tokens_total") > 0
    assert metric(http, "kvtier_time_to_first_token_seconds_count") > 0
    assert metric(http, "kvtier_prefix_cache_hits_total") > 0
