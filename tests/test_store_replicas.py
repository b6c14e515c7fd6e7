"""Engine replicas (`kvtier serve` processes) sharing one `kvtier store`
daemon: a prompt prefilled on one replica is a hit on another; a daemon that
dies costs misses, never a failed request, and comes back warm from its disk;
a replica with the wrong token, or of another tenant, is served nothing."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from servers import KvtierServer, StoreDaemon, tier_metric

OFFLOAD_TOKENS = 64
TOKEN = "replica-secret"
PROMPT = " ".join(f"Entry {i}: the {i}th visitor paid {i * 3 % 50} coins." for i in range(60))
OTHERS = [" ".join(f"Note {s}-{i}: {i * s % 31} boxes of pears." for i in range(30)) for s in range(2, 8)]


def replica(tmp_path, daemon: StoreDaemon, name: str, **tier_extra) -> KvtierServer:
    namespace = tier_extra.pop("namespace", None)
    extra = {"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 64_000_000, "block_size": OFFLOAD_TOKENS,
             "secondary_tiers": [daemon.tier_spec(timeout_s=2.0, backoff_s=0.2, max_backoff_s=1.0, **tier_extra)],
             **({"namespace": namespace} if namespace else {})}
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                                  "kv_connector_extra_config": extra}))
    return KvtierServer("--kv-transfer-config", f"@{config}", "--max-model-len", "2048",
                        "--num-gpu-blocks-override", "200").start()


def complete(server: KvtierServer, prompt: str = PROMPT):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    return client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8, temperature=0)


def cached(response) -> int:
    return response.usage.prompt_tokens_details.cached_tokens


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    daemon = StoreDaemon("--cpu-bytes", str(512 << 20), fs_path=str(tmp / "store"), token=TOKEN).start()
    started: list[KvtierServer] = []

    def start(name: str, **tier_extra) -> KvtierServer:
        server = replica(tmp, daemon, name, **{"token": TOKEN, **tier_extra})
        started.append(server)
        return server

    try:
        yield daemon, start
    finally:
        for server in started:
            server.close()
        daemon.close()


def test_a_prompt_served_by_one_replica_is_a_hit_on_another(fleet):
    daemon, start = fleet
    first, second = start("r1"), start("r2")
    cold = complete(first)
    assert cached(cold) == 0
    warm = complete(second)  # replica 2 has never seen it
    assert warm.choices[0].text == cold.choices[0].text
    # Everything but the last offload block's worth of the prompt came from the daemon.
    assert cached(warm) >= (cold.usage.prompt_tokens - 1) // OFFLOAD_TOKENS * OFFLOAD_TOKENS > 0
    assert tier_metric(second.url, "kvtier_kv_tier_hit_tokens_total", tier="store") >= cached(warm)
    assert tier_metric(second.url, "kvtier_kv_tier_bytes_total", tier="store", direction="out") > 0

    # The daemon dies while both replicas are busy: every request is still answered.
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(complete, server, prompt) for prompt in OTHERS for server in (first, second)]
        daemon.kill()
        answers = [future.result() for future in running]
    assert all(answer.choices[0].text for answer in answers)
    again = complete(first, OTHERS[0] + " And more.")  # misses only, the tier is down
    assert again.choices[0].text

    # It comes back from its disk: a replica that never saw PROMPT hits it.
    daemon.start()
    third = start("r3")
    late = complete(third)
    assert late.choices[0].text == cold.choices[0].text
    assert cached(late) >= (cold.usage.prompt_tokens - 1) // OFFLOAD_TOKENS * OFFLOAD_TOKENS
    assert tier_metric(third.url, "kvtier_kv_tier_hit_tokens_total", tier="store") > 0


def test_a_wrong_token_or_another_tenant_is_served_nothing(fleet):
    daemon, start = fleet
    owner = start("owner")
    reference = complete(owner, OTHERS[-1])
    intruder = start("intruder", token="not-the-token")
    tenant_b = start("tenant-b", namespace="tenant-b")
    for server in (intruder, tenant_b):
        answer = complete(server, OTHERS[-1])
        assert cached(answer) == 0  # no hits, and no error to the client
        assert answer.choices[0].text == reference.choices[0].text
        assert tier_metric(server.url, "kvtier_kv_tier_hit_tokens_total", tier="store") == 0
    assert tier_metric(intruder.url, "kvtier_kv_tier_errors_total", tier="store") > 0
