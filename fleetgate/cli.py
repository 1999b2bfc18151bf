"""Command line: `fleetgate serve | check | demo | keygen`."""

from __future__ import annotations

import argparse
import logging
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
    from .app import App, inherited_sockets

    app = App(config, stop_machines_on_exit=stop_machines_on_exit, sockets=inherited_sockets())
    async with trio.open_nursery() as nursery:
        running = await nursery.start(app.run)
        if on_started:
            on_started(running)
        nursery.start_soon(app.handle_signals)
        await running.shutdown.wait()
        nursery.cancel_scope.cancel()


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


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '2h', '1d' → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    factor = units.get(text[-1:], None)
    number = text[:-1] if factor else text
    try:
        value = float(number) * (factor or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration like 90s, 15m, 2h or 1d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value


def _admin(args: argparse.Namespace, method: str, path: str, params: dict | None = None) -> int:
    import json

    import httpx

    sock = args.admin_socket
    if sock is None:
        try:
            sock = str(load(args.config).gateway.admin_socket)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    from .unixsock import reachable

    try:
        with reachable(sock) as target, \
                httpx.Client(transport=httpx.HTTPTransport(uds=target), timeout=args.timeout) as client:
            r = client.request(method, f"http://fleetgate{path}", params=params)
    except (httpx.HTTPError, OSError) as exc:
        print(f"error: cannot reach the gateway's admin socket {sock}: {exc}", file=sys.stderr)
        return 1
    body = r.json()
    if r.status_code >= 400:
        print(f"error: {body.get('error', r.text)}", file=sys.stderr)
        return 1
    if path == "/machines" and not args.json:
        print(f"{'MACHINE':16} {'STATE':9} {'SESSIONS':>8} {'IDLE':>8} {'KEEP-AWAKE':>10}  BACKEND")
        for m in body:
            print(f"{m['machine']:16} {m['state']:9} {m['sessions']:>8} {m['idle_seconds']:>7.0f}s "
                  f"{m['keep_awake_seconds']:>9.0f}s  {m['backend']}")
    else:
        print(json.dumps(body, indent=1))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return _admin(args, "GET", "/machines")


def cmd_wake(args: argparse.Namespace) -> int:
    return _admin(args, "POST", f"/machines/{args.machine}/wake")


def cmd_stop(args: argparse.Namespace) -> int:
    return _admin(args, "POST", f"/machines/{args.machine}/stop", {"force": "1"} if args.force else None)


def cmd_keep_awake(args: argparse.Namespace) -> int:
    return _admin(args, "POST", f"/machines/{args.machine}/keep-awake", {"seconds": str(args.duration)})


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

    def admin_parser(name: str, help: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help)
        a.add_argument("-c", "--config", help="the gateway's config (to find its admin socket)")
        a.add_argument("--admin-socket", help="the gateway's admin socket (default: from the config)")
        a.add_argument("--timeout", type=float, default=300.0)
        a.add_argument("--json", action="store_true")
        return a

    a = admin_parser("status", "list machines with state, sessions, idle time and leases")
    a.set_defaults(func=cmd_status)
    a = admin_parser("wake", "start a machine now and wait until it answers")
    a.add_argument("machine")
    a.set_defaults(func=cmd_wake)
    a = admin_parser("stop", "stop a machine (refused while it has sessions unless --force)")
    a.add_argument("machine")
    a.add_argument("--force", action="store_true")
    a.set_defaults(func=cmd_stop)
    a = admin_parser("keep-awake", "hold a machine up (and wake it) for DURATION, e.g. 2h")
    a.add_argument("machine")
    a.add_argument("duration", type=parse_duration)
    a.set_defaults(func=cmd_keep_awake)

    k = sub.add_parser("keygen", help="write a new ed25519 key (and .pub) for host_keys or upstream_key")
    k.add_argument("path")
    k.set_defaults(func=cmd_keygen)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", "unset") is None and getattr(args, "admin_socket", "unset") is None:
        parser.error("give -c CONFIG or --admin-socket PATH")
    return args.func(args)
