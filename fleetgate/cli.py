"""Command line: `fleetgate serve | check | demo | keygen`."""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

import trio

from . import __version__
from .config import ConfigError, load


def _setup_logging(level: str, fmt: str = "text") -> None:
    from .logsetup import configure

    configure(level, fmt)


async def _run_app(config, stop_machines_on_exit: bool, on_started=None) -> None:
    from .app import App, inherited_sockets

    app = App(config, stop_machines_on_exit=stop_machines_on_exit, sockets=inherited_sockets())
    async with trio.open_nursery() as nursery:
        running = await nursery.start(app.run)
        # Signals are ours before the user is told the gateway is up: a Ctrl-C right after the
        # banner drains like any other, instead of a KeyboardInterrupt traceback mid-print.
        await nursery.start(app.handle_signals)
        if on_started:
            on_started(running)
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
    from . import fdlimit

    if config.limits is not None:  # descriptors: a flood must reach a limit before accept() fails
        for warning in fdlimit.check(config.limits.max_unauthenticated, fdlimit.default_http_connections(),
                                     fds_total=config.limits.fds_total):
            print(f"warning: {warning}", file=sys.stderr)
    _warn_isolation(config)
    if getattr(args, "connect", False):
        return _check_store(config)
    return 0


def _warn_isolation(config) -> None:
    """A process backend that must isolate its machines where this host cannot: `serve` would
    refuse. A warning, not an error: check may run as another user or on another host."""
    from .backends.process import isolation_problem

    for name, b in config.backends.items():
        if b.type == "process" and b.options.get("isolation", "namespaces") != "none":
            problem = isolation_problem(b.options.get("unshare"))
            if problem is not None:
                print(f"warning: backends.{name}: its machines cannot be isolated here ({problem}); "
                      f"`fleetgate serve` run like this refuses to start; isolation = \"none\" opts out",
                      file=sys.stderr)


def _check_store(config) -> int:
    """`fleetgate check --connect`: reach every etcd endpoint, then write, delete and lease under the prefix."""
    import dataclasses
    import os

    sc = config.store
    if sc is None or sc.type != "etcd":
        print("store: in-process (no [store] section); nothing to connect to")
        return 0
    from .store.base import StoreUnavailable
    from .store.client import Delete, EtcdClient, Put

    async def probe() -> int:
        failed = 0
        for endpoint in sc.endpoints:
            one = EtcdClient.from_config(dataclasses.replace(sc, endpoints=(endpoint,)))
            try:
                rev, _ = await one.range(sc.prefix)
                print(f"store: {endpoint} ok (revision {rev})")
            except StoreUnavailable as exc:
                failed += 1
                print(f"warning: store: {endpoint} does not answer: {exc}", file=sys.stderr)
            finally:
                await one.aclose()
        client = EtcdClient.from_config(sc)
        key = f"{sc.prefix.rstrip('/')}/check/{os.getpid()}"
        try:
            await client.txn([], [Put(key, b"fleetgate check")])
            await client.txn([], [Delete(key)])
            await client.lease_revoke(await client.lease_grant(sc.lease_ttl))
        except StoreUnavailable as exc:
            print(f"error: store: cannot write to etcd under {sc.prefix}: {exc}", file=sys.stderr)
            return 1
        finally:
            await client.aclose()
        print(f"store: etcd ok (write, delete and lease under {sc.prefix}; "
              f"{len(sc.endpoints) - failed} of {len(sc.endpoints)} endpoints answer)")
        return 0

    return trio.run(probe)


def _start_failure(exc: BaseException) -> str | None:
    """One line for an error that stops the gateway from starting (None: a bug, let it raise)."""
    import asyncssh

    leaves = [exc]
    while leaves and isinstance(leaves[0], BaseExceptionGroup):
        leaves = list(leaves[0].exceptions) + leaves[1:]
    for leaf in leaves:
        if isinstance(leaf, (OSError, ConfigError, asyncssh.KeyImportError, ValueError)):
            return f"{type(leaf).__name__}: {leaf}"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, args.log_format)
    try:
        config = load(args.config)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"error: {issue}", file=sys.stderr)
        return 1
    try:
        trio.run(_run_app, config, False)
    except KeyboardInterrupt:  # Ctrl-C while starting, before the signal handlers were in place
        return 130
    except BaseException as exc:  # bad config or environment at start: one line, the traceback at debug level
        line = _start_failure(exc)
        if line is None:
            raise
        logging.getLogger("fleetgate.cli").debug("start failed", exc_info=exc)
        print(f"error: fleetgate cannot start with {args.config}: {line}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    _setup_logging(args.log_level, args.log_format)
    state_dir = Path(args.state_dir) if args.state_dir else demo.default_state_dir()
    metrics_port = None if args.metrics_port == 0 else args.metrics_port
    if args.monitoring and metrics_port is None:
        print("--monitoring needs the metrics listener (--metrics-port other than 0)", file=sys.stderr)
        return 2
    if args.monitoring:
        from . import demo_stack

        try:  # before anything starts: say at once what is missing
            demo_stack.find_binaries()
            demo_stack.find_assets(Path(args.monitoring_dir) if args.monitoring_dir else None)
        except FileNotFoundError as exc:
            print(f"fleetgate demo --monitoring: {exc}", file=sys.stderr)
            return 1
    cfg_path = demo.prepare(state_dir, args.port, metrics_port, boot_delay=args.boot_delay,
                            idle_timeout=args.idle_timeout, min_uptime=args.min_uptime, isolation=args.isolation,
                            broken=args.monitoring)
    try:
        config = load(cfg_path)
    except ConfigError as exc:
        print(f"demo config is broken: {exc}", file=sys.stderr)
        return 1

    if not args.monitoring:
        def started(running) -> None:
            print(demo.instructions(state_dir, running.ssh_ports[0], running.metrics_port), flush=True)

        try:
            trio.run(_run_app, config, True, started)
        except KeyboardInterrupt:  # Ctrl-C while starting, before the signal handlers were in place
            return 130
        return 0
    try:
        return trio.run(_run_demo_with_monitoring, config, state_dir, args)
    except KeyboardInterrupt:
        return 130


async def _run_demo_with_monitoring(config, state_dir: Path, args: argparse.Namespace) -> int:
    """The demo gateway, then Prometheus, Alertmanager and a webhook receiver watching it (demo_stack)."""
    from . import demo, demo_stack

    async with trio.open_nursery() as nursery:
        gateway_started = trio.Event()
        ports: list = []

        def started(running) -> None:
            ports.append((running.ssh_ports[0], running.metrics_port))
            gateway_started.set()

        async def gateway() -> None:
            await _run_app(config, True, started)
            nursery.cancel_scope.cancel()  # the gateway stopped (Ctrl-C): so does the monitoring

        nursery.start_soon(gateway)
        with trio.fail_after(60):
            await gateway_started.wait()
        port, metrics_port = ports[0]
        urls = await nursery.start(partial(demo_stack.run, state_dir / "monitoring", metrics_port,
                                           assets=Path(args.monitoring_dir) if args.monitoring_dir else None))
        text = demo.instructions(state_dir, port, metrics_port)
        base = (f"ssh -p {port} -i {state_dir}/client_key -o UserKnownHostsFile={state_dir}/known_hosts "
                "-o IdentitiesOnly=yes")
        head, _, tail = text.rpartition("\n")  # the last line says how to stop
        print(f"{head}\n{demo_stack.instructions(urls, base, state_dir / 'monitoring')}\n{tail}", flush=True)
    return 0


def parse_duration(text: str, allow_zero: bool = False) -> float:
    """'90', '90s', '15m', '2h', '1d' → seconds (the same forms as durations in the config)."""
    from .config import duration_seconds

    try:
        value = duration_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError("a duration must be positive" if not allow_zero else
                                         "a duration must be 0 or more")
    return value


def parse_duration_or_zero(text: str) -> float:
    return parse_duration(text, allow_zero=True)


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
        if body and "replica" in body[0]:
            holds = {r for m in body for r in m.get("holds", {})}
            print(f"(fleet-wide via etcd; answered by replica {body[0]['replica']}"
                  f"{'' if body[0]['store_healthy'] else ', STORE UNAVAILABLE: local view only'}; "
                  f"replicas holding sessions: {', '.join(sorted(holds)) or 'none'})")
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
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text: key=value lines, values quoted; json: one object per line")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("-c", "--config", required=True)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="validate a config file and list every problem")
    c.add_argument("-c", "--config", required=True)
    c.add_argument("--connect", action="store_true", help="also reach the shared store ([store]) and test it")
    c.set_defaults(func=cmd_check)

    d = sub.add_parser("demo", help="run the gateway on a demo fleet of local sshds")
    d.add_argument("--port", type=int, default=2222)
    d.add_argument("--metrics-port", type=int, default=9180, help="0 disables the metrics listener")
    d.add_argument("--state-dir", help="where keys and config are written (default: ~/.local/state/fleetgate/demo)")
    d.add_argument("--boot-delay", type=parse_duration_or_zero, default=0.0,
                   help="added to each machine's start (90, 90s, 15m, 2h)")
    d.add_argument("--idle-timeout", type=parse_duration, default=None,
                   help="without sessions before a stop (90, 90s, 15m, 2h)")
    d.add_argument("--min-uptime", type=parse_duration_or_zero, default=None,
                   help="a machine stays up at least this long (90, 90s, 15m, 2h)")
    d.add_argument("--isolation", choices=("auto", "namespaces", "none"), default="auto",
                   help="process machines in their own namespaces and accounts (needs root); auto: where possible")
    d.add_argument("--monitoring", action="store_true",
                   help="also start Prometheus (the project's rules) and Alertmanager (alerts/alertmanager.yml) "
                        "watching the demo, print their notifications, and add a machine `broken` whose wake fails")
    d.add_argument("--monitoring-dir", help="the alerts/ directory of a fleetgate checkout (default: found next to "
                                            "the package)")
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
    from .warnpolicy import quiet_dependencies

    quiet_dependencies()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", "unset") is None and getattr(args, "admin_socket", "unset") is None:
        parser.error("give -c CONFIG or --admin-socket PATH")
    return args.func(args)
