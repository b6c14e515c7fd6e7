"""docker-compose.yml cannot run here (no Docker engine): check what it says."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from kvtier.connectors.config import parse_kv_transfer_config
from kvtier.engine.entrypoints.cli import build_parser
from kvtier.kvstore.daemon import load_store_config
from kvtier.kvstore.tiers import parse_tier_spec

COMPOSE = yaml.safe_load((Path(__file__).parents[1] / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def replicas() -> dict[str, dict]:
    return {name: s for name, s in SERVICES.items() if name.startswith("replica")}


def kvtier_args(service: dict, subcommand: str) -> list[str]:
    """The words after `kvtier <subcommand>` in a service's `sh -c "..."` command."""
    inner = re.search(r'sh -c "(.*)"', service["command"], re.S).group(1).replace('\\"', '"')
    words = shlex.split(inner)
    return words[words.index(subcommand) + 1:]


def serve_args(service: dict) -> list[str]:
    return kvtier_args(service, "serve")


def store_config():
    """The daemon's StoreConfig, from its flags, through the real parser and model."""
    args = build_parser().parse_args(["store", *kvtier_args(SERVICES["kvstore"], "store")])
    fields = ("host", "port", "cpu_bytes", "fs_path", "fs_bytes", "eviction_policy", "token_file", "metrics_port")
    return load_store_config(args.config_file, {name: getattr(args, name) for name in fields})


def test_services_and_dependencies():
    assert {"kvstore", "minio", "redis"} <= set(SERVICES) and len(replicas()) >= 2
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
        assert [t["type"] for t in tiers] == ["store", "obj"], "the daemon first, MinIO beneath it"
        assert "kvstore" in service["depends_on"]
        for spec in tiers:
            parse_tier_spec(spec)  # the tier JSON is valid for kvstore
            if spec["type"] == "obj":
                assert spec["endpoint_override"].startswith("minio:")
                assert f"local/{spec['bucket']}" in bucket_setup  # the bucket is created first
                env = SERVICES["minio"]["environment"]
                assert (spec["access_key"], spec["secret_key"]) == (env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"])
            if spec["type"] == "store":
                daemon = store_config()
                assert spec["url"] == f"kvtier://kvstore:{daemon.port}"
                assert spec["token"] == SERVICES["kvstore"]["environment"]["KVTIER_STORE_TOKEN"]


def test_the_store_daemon_persists_to_a_volume_with_a_valid_config():
    daemon = store_config()
    assert daemon.host == "0.0.0.0" and daemon.fs_path and daemon.metrics_port
    volumes = SERVICES["kvstore"]["volumes"]
    assert any(v.split(":")[0] in COMPOSE["volumes"] and v.split(":")[1] == daemon.fs_path for v in volumes)
    published = {p.split(":")[1] for p in SERVICES["kvstore"]["ports"]}
    assert {str(daemon.port), str(daemon.metrics_port)} <= published
