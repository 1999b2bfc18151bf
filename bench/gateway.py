"""A fleetgate gateway in its own process, for benchmarks.

Why not `fleetgate demo`: the benchmark must vary gateway config keys (window,
max_packet, ciphers) and stop a machine on demand to time a wake, without waiting for the
reaper. This runs the same App over the same demo fleet (demo.prepare), in its own
process and so on its own CPU, like production, and takes commands on stdin:

    stop NAME   stop the machine now; answers "ok"
    (EOF)       shut down, stopping the machines

On start it prints one JSON line: {"port": ..., "pid": ..., "machines": {name: port}}.
The fleetgate package is whatever `import fleetgate` finds, so PYTHONPATH can point the
benchmark at a scratch copy of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import trio

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`gateway.window=1048576` → {"gateway": {"window": 1048576}}; values are TOML values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=TOML_VALUE, e.g. gateway.window=1048576")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = parsed
    return out


def merge(doc: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            merge(doc[k], v)
        else:
            doc[k] = v


async def _commands(running: Any) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buf = b""
    while True:
        chunk = await stdin.receive_some(4096)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            words = line.decode().split()
            if words[:1] == ["stop"] and len(words) == 2:
                await running.fleet.stop(words[1])
                print("ok", flush=True)
            else:
                print(f"error: unknown command {line!r}", flush=True)


async def _pin(gateway_core: int, others: set[int], shutdown: trio.Event) -> None:
    """bench/compare.py --gateway-core: this process on its core, what it starts (the machines'
    sshd, whose sessions inherit it) on the others, checked twice a second."""
    os.sched_setaffinity(0, {gateway_core})
    me = os.getpid()
    while not shutdown.is_set():
        pending = [me]
        while pending:
            pid = pending.pop()
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                try:
                    if os.sched_getaffinity(kid) != others:
                        os.sched_setaffinity(kid, others)
                except OSError:
                    pass
                pending.append(kid)
        with trio.move_on_after(0.5):
            await shutdown.wait()


async def _main(args: argparse.Namespace) -> None:
    from fleetgate import config as config_mod
    from fleetgate import demo
    from fleetgate.app import App

    state_dir = Path(args.state_dir)
    # The direct baseline connects to each machine's sshd from this host, so the machines run
    # without network namespaces here (isolation does not change the relay path's cost; its
    # wake cost is bench/process_wake.py's). Older fleetgate versions have no such option.
    import inspect
    extra = {"isolation": "none"} if "isolation" in inspect.signature(demo.prepare).parameters else {}
    cfg_path = Path(args.config) if args.config else demo.prepare(state_dir, 0, None, **extra)
    doc = tomllib.loads(cfg_path.read_text())
    merge(doc, parse_sets(args.set))
    cfg = config_mod.parse(doc, file=str(cfg_path), base_dir=state_dir)
    app = App(cfg, stop_machines_on_exit=True)
    async with trio.open_nursery() as nursery:
        running = await nursery.start(app.run)
        pin = os.environ.get("FLEETGATE_BENCH_PIN")
        if pin:
            core, _, rest = pin.partition(":")
            nursery.start_soon(_pin, int(core), {int(c) for c in rest.split(",")}, running.shutdown)
        machines = {name: int(m.options["port"]) for name, m in cfg.machines.items() if "port" in m.options}
        print(json.dumps({"port": running.ssh_ports[0], "pid": os.getpid(), "machines": machines,
                          "fleetgate": os.path.dirname(config_mod.__file__)}), flush=True)
        await _commands(running)
        running.shutdown.set()



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--config", help="this fleetgate.toml instead of the demo fleet's (bench/sessions.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="patch the demo config, e.g. --set gateway.window=1048576")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(_main, args)


if __name__ == "__main__":
    main()
