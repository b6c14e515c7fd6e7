"""The `kvtier` command: `kvtier serve [MODEL] ...` with vLLM's flag names.

A mistake in a flag or in the configuration ends with one line naming the
flag or field and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from pydantic import ValidationError

from kvtier.engine.config import EngineConfig
from kvtier.kvstore.daemon.config import TOKEN_ENV as STORE_TOKEN_ENV
from kvtier.kvstore.validation import ConfigError, describe


class UsageError(Exception):
    """A bad flag value or configuration: reported in one line, exit status 2."""


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_engine_args(serve: argparse.ArgumentParser) -> None:
    # dest == the EngineConfig field; None means "not given": EngineConfig's
    # own default applies, so defaults are not repeated here.
    serve.add_argument("model_tag", nargs="?", metavar="MODEL",
                       help="model: a .gguf file, an HF-format directory, or the default model's name")
    serve.add_argument("--model", help="alternative to the positional MODEL")
    serve.add_argument("--served-model-name", nargs="+", help="name(s) the API serves the model under")
    serve.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    serve.add_argument("--kv-cache-dtype", choices=["auto", "float32", "float16", "bfloat16"],
                       help="dtype of the KV cache in the pool and every tier (auto: the model's dtype); "
                            "16 bits halve its bytes")
    serve.add_argument("--seed", type=int)
    serve.add_argument("--max-model-len", type=int, help="context length (prompt + output) in tokens")
    serve.add_argument("--block-size", type=int, help="tokens per KV cache block")
    serve.add_argument("--max-num-seqs", type=int, help="most requests in one batch")
    serve.add_argument("--max-num-batched-tokens", type=int, help="most tokens computed in one step")
    serve.add_argument("--num-gpu-blocks-override", type=int, help="KV cache pool size in blocks")
    serve.add_argument("--gpu-memory-utilization", type=float,
                       help="fraction of device memory (on the CPU: of the KV cache budget) to use")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    serve.add_argument("--preemption-mode", choices=["swap", "recompute"],
                       help="what a preempted request does with its KV: keep it in the KV connector's CPU "
                            "tier (swap, the default when there is one) or recompute it")
    serve.add_argument("--scheduling-policy", choices=["fcfs", "priority"],
                       help="fcfs (default), or priority: the request body's 'priority', lower first")
    serve.add_argument("--long-prefill-token-threshold", type=int,
                       help="a prefill with more tokens than this to go computes at most this many a step, "
                            "after decodes and short prefills (0: off, the default)")
    serve.add_argument("--max-num-partial-prefills", type=int,
                       help="with a threshold: most prefills a step that do not complete in it (default 1)")
    serve.add_argument("--max-long-partial-prefills", type=int,
                       help="with a threshold: most long prefills a step (default 1)")
    serve.add_argument("--kv-transfer-config", metavar="JSON|@FILE",
                       help="vLLM-style KV connector config, inline JSON or @path/to/file.json")
    serve.add_argument("--kv-events-config", metavar="JSON",
                       help='vLLM-style KV events, e.g. \'{"enable_kv_cache_events": true, "publisher": "zmq", '
                            '"endpoint": "tcp://*:5557"}\'')


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="kvtier", description="LLM serving with tiered KV-cache offloading")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the OpenAI-compatible server")
    _add_engine_args(serve)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer <key>' on every route but /health "
                                         "(KVTIER_API_KEY in the environment keeps it out of `ps`)")
    serve.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    serve.add_argument("--max-request-bytes", type=int, default=32 << 20,
                       help="largest request body accepted (413 beyond it)")
    serve.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    _add_store_args(commands.add_parser("store", help="run the KV store daemon that engine replicas share"))
    return parser


def _add_store_args(store: argparse.ArgumentParser) -> None:
    # dest == the StoreConfig field; None: the config file's value or the model's default.
    store.add_argument("--config", dest="config_file", metavar="FILE", help="a JSON file of StoreConfig fields")
    store.add_argument("--host")
    store.add_argument("--port", type=int)
    store.add_argument("--cpu-bytes", type=int, help="the memory pool, in bytes")
    store.add_argument("--fs-path", help="directory the daemon persists objects to (and reloads them from)")
    store.add_argument("--fs-bytes", type=int, help="capacity of --fs-path in bytes")
    store.add_argument("--eviction-policy", help="lru, lfu, arc or s3fifo")
    store.add_argument("--token-file", help=f"file holding the shared token (or ${STORE_TOKEN_ENV})")
    store.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics and /health on this port")
    store.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run_store(args: argparse.Namespace) -> None:
    import signal

    import zmq

    from kvtier.kvstore.daemon import StoreServer, load_store_config

    fields = ("host", "port", "cpu_bytes", "fs_path", "fs_bytes", "eviction_policy", "token_file", "metrics_port")
    try:
        cfg = load_store_config(args.config_file, {name: getattr(args, name) for name in fields})
        server = StoreServer(cfg)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except (OSError, zmq.ZMQError) as e:  # the port is taken, the directory cannot be made
        raise UsageError(f"cannot start: {e}") from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop())
    metrics = f", metrics on :{server.metrics_port}" if server.metrics_port else ""
    print(f"kvtier store: listening on tcp://{cfg.host}:{server.port}{metrics}", flush=True)
    server.serve_forever()


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    from kvtier.connectors.config import parse_kv_transfer_config

    if args.model_tag and args.model and args.model_tag != args.model:
        raise UsageError(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
    fields = {name: value for name, value in vars(args).items()
              if name in EngineConfig.model_fields and value is not None}
    if args.model_tag:
        fields["model"] = args.model_tag
    try:
        fields["kv_transfer_config"] = parse_kv_transfer_config(args.kv_transfer_config)
        return EngineConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        _, message = describe({**err, "loc": ()})
        flag = f"argument --{err['loc'][0].replace('_', '-')}: " if err["loc"] else ""
        raise UsageError(flag + message) from None
    except ValueError as e:  # parse_kv_transfer_config names the field itself
        raise UsageError(str(e)) from None


def serve(args: argparse.Namespace) -> None:
    config = engine_config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from kvtier.engine.entrypoints.async_engine import AsyncLLMEngine
    from kvtier.engine.entrypoints.server import build_app

    try:
        engine = AsyncLLMEngine.from_config(config)
    except ConfigError as e:  # caught while building a part: still the configuration's fault
        raise UsageError(str(e)) from None
    except (ValueError, OSError) as e:  # a model that is not there or not supported
        raise UsageError(f"cannot load model {config.model!r}: {e}") from None
    try:
        api_key = args.api_key or os.environ.get("KVTIER_API_KEY") or None
        app = build_app(engine, config.served_names, api_key, metrics_public=args.metrics_public,
                        max_request_bytes=args.max_request_bytes)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                               log_level=args.uvicorn_log_level))
        server.run()
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from kvtier.engine.entrypoints.server import kvtier_version
        print(f"kvtier {kvtier_version()}")
        return 0
    try:
        if args.command == "serve":
            serve(args)
            return 0
        if args.command == "store":
            run_store(args)
            return 0
    except UsageError as e:
        parser.exit(2, f"kvtier {args.command}: error: {e}\n")
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
