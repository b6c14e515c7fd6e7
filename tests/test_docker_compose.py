"""docker-compose.yml cannot run here (no Docker engine): check what it says."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from kvtier.connectors.config import parse_kv_transfer_config
from kvtier.kvstore.tiers import parse_tier_spec

COMPOSE = yaml.safe_load((Path(__file__).parents[1] / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def replicas() -> dict[str, dict]:
    return {name: s for name, s in SERVICES.items() if name.startswith("replica")}


def serve_args(service: dict) -> list[str]:
    command = service["command"]
    inner = re.search(r'sh -c "(.*)"', command, re.S).group(1).replace('\\"', '"')
    words = shlex.split(inner)
    return words[words.index("serve") + 1:]


def test_services_and_dependencies():
    assert {"minio", "redis"} <= set(SERVICES) and len(replicas()) >= 2
    for name, service in SERVICES.items():
        for dep in service.get("depends_on", {}):
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
    host_ports = [p.split(":")[0] for s in SERVICES.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"


def test_replicas_serve_with_a_valid_shared_tier_config():
    bucket_setup = SERVICES["minio-bucket"]["entrypoint"]
    for name, service in replicas().items():
        args = serve_args(service)
        assert args[args.index("--host") + 1] == "0.0.0.0"
        ktc = parse_kv_transfer_config(args[args.index("--kv-transfer-config") + 1])
        assert ktc.kv_connector == "OffloadingConnector"
        tiers = ktc.kv_connector_extra_config["secondary_tiers"]
        kinds = {t["type"] for t in tiers}
        assert {"redis", "obj"} <= kinds
        for spec in tiers:
            parse_tier_spec(spec)  # the tier JSON is valid for kvstore
            if spec["type"] == "obj":
                assert spec["endpoint_override"].startswith("minio:")
                assert f"local/{spec['bucket']}" in bucket_setup  # the bucket is created first
                env = SERVICES["minio"]["environment"]
                assert (spec["access_key"], spec["secret_key"]) == (env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"])
            if spec["type"] == "redis":
                assert "//redis:" in spec["url"]
