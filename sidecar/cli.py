"""The `sidecar` command: run, check, demo, --version."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import yaml

from sidecar import __version__
from sidecar.config import Config, ConfigError, load_config
from sidecar.config.describe import describe, json_schema
from sidecar.delivery.store import StoreError
from sidecar.telemetry.logs import setup_json_logging

GC_THRESHOLD = 7000  # young-generation threshold while serving (Python's default: 700)


def main(argv: list[str] | None = None) -> int:
    # frozenlist's C extension links the C++ runtime: about 1 MiB resident in every pod, for
    # lists aiohttp touches only at start-up (signals, middlewares). Its pure-Python twin is
    # the same class. aiohttp is imported later (each command imports what it needs), so
    # this is in time; an operator's own setting wins.
    os.environ.setdefault("FROZENLIST_NO_EXTENSIONS", "1")
    parser = argparse.ArgumentParser(prog="sidecar", description="A resilience proxy that runs next to your service.")
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the sidecar until SIGINT or SIGTERM")
    run.add_argument("-c", "--config", default=os.environ.get("SIDECAR_CONFIG"),
                     help="config file (default: $SIDECAR_CONFIG)")
    run.add_argument("--workers", type=int, default=1, metavar="N",
                     help="worker processes sharing the ports (default 1; breaker state is per worker)")
    run.add_argument("--watch", type=float, nargs="?", const=1.0, default=None, metavar="SECONDS",
                     help="reload when the config file changes (checked every SECONDS, default 1)")
    run.add_argument("--state-dir", default=None, metavar="DIR",
                     help="where durable delivery keeps its queue (default: $SIDECAR_STATE_DIR, "
                          "else ~/.local/state/sidecar)")
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by the supervisor
    _add_loop_option(run)

    check = commands.add_parser("check", help="validate a config and print every route's effective policy")
    check.add_argument("path")

    commands.add_parser("schema", help="print the JSON Schema of the config file")

    demo = commands.add_parser("demo", help="run a misbehaving demo upstream with the sidecar in front of it")
    demo.add_argument("--listen", default="127.0.0.1:15001", help="sidecar traffic address")
    demo.add_argument("--admin", default="127.0.0.1:9901", help="sidecar admin address")
    demo.add_argument("--upstream", default="127.0.0.1:18080", help="demo upstream address")
    _add_loop_option(demo)

    args = parser.parse_args(argv)
    setup_json_logging()
    if args.command == "check":
        return _check(args.path)
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "run":
        if not args.config:
            parser.error("run needs --config PATH (or SIDECAR_CONFIG)")
        if args.workers < 1:
            parser.error("--workers must be at least 1")
        if args.state_dir:
            os.environ["SIDECAR_STATE_DIR"] = args.state_dir  # workers inherit it
        if args.workers > 1:
            from sidecar.runtime.workers import supervise

            # Validate once here, so a broken config fails fast instead of in every worker.
            try:
                config = load_config(args.config)
            except ConfigError as exc:
                print(f"{args.config}: {exc}", file=sys.stderr)
                return 1
            if (failure := _check_delivery_store(config)) is not None:
                print(f"sidecar: {failure}", file=sys.stderr)  # once here, not from every worker
                return 1
            return supervise(args.config, args.workers, args.loop, args.watch)
        return _run(args.config, args.loop, args.watch, args.worker)
    return _demo(args)


def _add_loop_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="event loop implementation (default: asyncio)")


def _check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    print(f"# {path}: valid")
    print(yaml.safe_dump(describe(config), sort_keys=False), end="")
    return 0


def _check_delivery_store(config: Config) -> str | None:
    """Open and close the delivery store when a route queues: why it cannot be opened, or None."""
    if not any(route.delivery for route in config.routes):
        return None
    from sidecar.delivery.store import StoreError, open_store
    from sidecar.runtime.sidecar import default_state_dir

    async def check() -> None:
        store = await open_store(config.delivery.store, default_state_dir())
        await store.close()

    try:
        asyncio.run(check())
    except StoreError as exc:
        return str(exc)
    return None


def _run(path: str, loop: str, watch: float | None, worker: bool) -> int:
    from sidecar.runtime.sidecar import Sidecar, serve_until_stopped

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    sidecar = Sidecar(config, config_path=path, reuse_port=worker)
    # Python's cyclic GC runs a young-generation pass every 700 net allocations. With
    # requests in flight that threshold is crossed constantly although a request leaves
    # almost no cycles behind, and each full pass walks every object loaded at start:
    # about 4 us per request at 14k req/s. Ten times the threshold keeps cycles bounded
    # (at most a few thousand objects wait) and GC out of the per-request cost.
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    if worker:
        from sidecar.runtime.workers import serve_as_worker

        # Reloads and cache purges through one worker's admin API reach the others.
        return run_until_signal(lambda stop: serve_as_worker(sidecar, stop, watch), loop)
    return run_until_signal(lambda stop: serve_until_stopped(sidecar, stop, watch), loop)


def _demo(args: argparse.Namespace) -> int:
    from sidecar.runtime.demo import run_demo

    return run_until_signal(lambda stop: run_demo(args.listen, args.admin, args.upstream, stop), args.loop)


def run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]], loop: str) -> int:
    """Run `main` until SIGINT or SIGTERM sets its stop event; report bind errors plainly."""

    async def runner() -> None:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        await main(stop)

    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as asyncio_runner:
            asyncio_runner.run(runner())
    except OSError as exc:
        print(f"sidecar: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except StoreError as exc:  # a queued route's store cannot be opened: it names the directory or file
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    return 0
