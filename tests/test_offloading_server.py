"""`kvtier serve --kv-transfer-config` with a filesystem tier, across a restart of
the whole server: the second process is served the first one's blocks."""
from __future__ import annotations

import json

import openai

from servers import KvtierServer, tier_metric

PROMPT = " ".join(f"Entry {i}: the {i}th visitor paid {i * 3 % 50} coins." for i in range(60))


def complete(url: str):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    return client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=8, temperature=0)


def test_fs_tier_survives_a_server_restart(tmp_path):
    ktc = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 64_000_000,
                                         "block_size": 64,
                                         "secondary_tiers": [{"type": "fs", "path": str(tmp_path / "kv")}]}}
    config_file = tmp_path / "ktc.json"
    config_file.write_text(json.dumps(ktc))
    args = ("--kv-transfer-config", f"@{config_file}", "--max-model-len", "2048", "--num-gpu-blocks-override", "200")

    first = KvtierServer(*args).start()
    try:
        cold = complete(first.url)
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        first.stop()  # SIGTERM: the server finishes its queued stores before it exits
        first.close()
    assert any(p.is_file() for p in (tmp_path / "kv").rglob("*")), "nothing reached the disk"

    second = KvtierServer(*args).start()
    try:
        warm = complete(second.url)
        assert warm.choices[0].text == cold.choices[0].text
        assert warm.usage.prompt_tokens_details.cached_tokens >= (cold.usage.prompt_tokens - 1) // 64 * 64 > 0
        assert tier_metric(second.url, "kvtier_kv_tier_bytes_total", tier="fs", direction="out") > 0
        # Counted once: the tokens the tier really served, not once per lookup and once per load.
        assert tier_metric(second.url, "kvtier_kv_tier_hit_tokens_total", tier="fs") == \
            warm.usage.prompt_tokens_details.cached_tokens
    finally:
        second.close()
