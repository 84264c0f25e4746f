"""The `aggregator` command: serve, demo, check-config, call."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from aggregator.client import add_arguments as add_call_arguments
from aggregator.client import run as run_call
from aggregator.config import ConfigError
from aggregator.load import load, load_text
from aggregator.logs import configure as configure_logging
from aggregator.reload import ConfigFile
from aggregator.reload import read as read_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aggregator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument(
        "--config",
        default=os.environ.get("AGGREGATOR_CONFIG"),
        help="YAML config file (default: $AGGREGATOR_CONFIG)",
    )
    commands.add_parser("demo", help="run built-in upstreams and show an aggregate streaming in")
    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("path", help="the YAML file, or - to read it from standard input")
    call = commands.add_parser(
        "call",
        help="send a request (JSON or YAML) to a running server and draw its results on a timeline",
        description="Sends one AggregateRequest and draws each target as a bar on a time axis "
        "as results arrive, then the status and the trailers. Exit status: 0 status OK, "
        "1 another status, 2 unusable request or options.",
    )
    add_call_arguments(call)
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "check-config":
        return _check_config(args.path)
    if args.command == "call":
        return run_call(args)
    if args.command == "demo":
        from aggregator.demo import run_demo

        asyncio.run(run_demo())
        return 0
    return _serve(args.config)


def _check_config(path: str) -> int:
    try:
        loaded = load_text(sys.stdin.read(), source="<stdin>") if path == "-" else load(path)
    except ConfigError as exc:
        print("\n".join(exc.problems))
        return 1
    for warning in loaded.config.warnings:
        print(f"warning: {warning}")
    print("ok")
    return 0


def _serve(path: str | None) -> int:
    if not path:
        print("aggregator serve: --config PATH or AGGREGATOR_CONFIG is required", file=sys.stderr)
        return 2
    try:
        text, digest = read_config(path)
        loaded = load_text(text, source=path)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    config = loaded.config
    # SIGHUP reloads the config once the server's loop is up; until then (and in the workers'
    # parent, which forwards it) it must not end the process, as its default action would.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    source = ConfigFile(path, digest, loaded.catalog)
    configure_logging(config.server.log_format, config.server.log_level)
    for warning in config.warnings:
        logging.getLogger("aggregator").warning("config: %s", warning)
    if config.server.workers > 1:
        from aggregator.workers import run_workers

        return run_workers(config, source)
    from aggregator.lifecycle import run

    try:
        run(config, source)
    except OSError as exc:
        print(f"aggregator serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
