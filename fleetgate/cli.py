"""Command line: `fleetgate serve | check | demo | keygen`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from . import __version__
from .config import ConfigError, load


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # asyncssh logs every channel request at INFO; its warnings are what operators need.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


async def _run_app(config, stop_machines_on_exit: bool, on_started=None) -> None:
    from .app import App

    app = App(config, stop_machines_on_exit=stop_machines_on_exit)
    async with trio.open_nursery() as nursery:
        running = await nursery.start(app.run)
        if on_started:
            on_started(running)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logging.getLogger("fleetgate").info("signal %s: shutting down", signal.Signals(signum).name)
                running.shutdown.set()
                break


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"error: {issue}", file=sys.stderr)
        print(f"{args.config}: {len(exc.issues)} error(s); nothing was started", file=sys.stderr)
        return 1
    print(f"{args.config}: ok ({len(config.users)} users, {len(config.machines)} machines, "
          f"{len(config.backends)} backends)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    try:
        config = load(args.config)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"error: {issue}", file=sys.stderr)
        return 1
    trio.run(_run_app, config, False)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    _setup_logging(args.log_level)
    state_dir = Path(args.state_dir) if args.state_dir else demo.default_state_dir()
    metrics_port = None if args.metrics_port == 0 else args.metrics_port
    cfg_path = demo.prepare(state_dir, args.port, metrics_port, boot_delay=args.boot_delay,
                            idle_timeout=args.idle_timeout, min_uptime=args.min_uptime)
    try:
        config = load(cfg_path)
    except ConfigError as exc:
        print(f"demo config is broken: {exc}", file=sys.stderr)
        return 1

    def started(running) -> None:
        print(demo.instructions(state_dir, running.ssh_ports[0], running.metrics_port), flush=True)

    trio.run(_run_app, config, True, started)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from .keys import ensure_key, public_line

    path = Path(args.path)
    if path.exists():
        print(f"{path} exists; not overwriting", file=sys.stderr)
        return 1
    print(public_line(ensure_key(path)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetgate", description=__doc__)
    p.add_argument("--version", action="version", version=f"fleetgate {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("-c", "--config", required=True)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="validate a config file and list every problem")
    c.add_argument("-c", "--config", required=True)
    c.set_defaults(func=cmd_check)

    d = sub.add_parser("demo", help="run the gateway on a demo fleet of local sshds")
    d.add_argument("--port", type=int, default=2222)
    d.add_argument("--metrics-port", type=int, default=9180, help="0 disables the metrics listener")
    d.add_argument("--state-dir", help="where keys and config are written (default: ~/.local/state/fleetgate/demo)")
    d.add_argument("--boot-delay", type=float, default=0.0, help="seconds added to each machine's start")
    d.add_argument("--idle-timeout", type=float, default=None, help="seconds without sessions before a stop")
    d.add_argument("--min-uptime", type=float, default=None, help="seconds a machine stays up at least")
    d.set_defaults(func=cmd_demo)

    k = sub.add_parser("keygen", help="write a new ed25519 key (and .pub) for host_keys or upstream_key")
    k.add_argument("path")
    k.set_defaults(func=cmd_keygen)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
