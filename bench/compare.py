"""A/B comparison of gateway variants under the same noise: paired rounds, one direct baseline.

Why: on a shared 2-core machine, two benchmark runs minutes apart see different load, so
comparing their numbers measures the neighbours as much as the change. This starts every
variant's gateway at once (each with its own demo fleet) and, round after round, runs the
same transfer directly and through each variant back to back. The ratio vs direct is
taken within a round; the gateway's own CPU seconds per GiB is the steadier number.

A variant is NAME followed by ;-separated settings:
    env KEY=VALUE      environment of that gateway process (e.g. PYTHONPATH=/tmp/fg-exp)
    set KEY=VALUE      gateway config change (as relay.py --set)
    script PATH        another runner speaking bench/gateway.py's protocol

Example:
    .venv/bin/python bench/compare.py --size 256MiB --rounds 6 \\
        --variant base --variant 'win2m;set gateway.window=2097152'
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import statistics
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay import MIB, SCP_OPTS, Gateway, Ways, make_file, parse_size, run, transfer  # noqa: E402


@dataclass
class Variant:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)
    script: Path | None = None

    @classmethod
    def parse(cls, text: str) -> "Variant":
        name, *parts = [p.strip() for p in text.split(";")]
        v = cls(name)
        for part in filter(None, parts):
            kind, _, rest = part.partition(" ")
            if kind == "env":
                k, _, val = rest.partition("=")
                v.env[k] = val
            elif kind == "set":
                v.sets.append(rest)
            elif kind == "script":
                v.script = Path(rest)
            else:
                raise SystemExit(f"--variant {text!r}: unknown setting {kind!r} (env, set or script)")
        return v


@contextmanager
def patched_env(env: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=256 * MIB)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--cipher", default="aes128-gcm", choices=["default", "aes128-gcm"])
    p.add_argument("--directions", default="upload,download")
    p.add_argument("--mode", default="relay", choices=["relay", "jump"])
    p.add_argument("--legacy-scp", action="store_true", help="scp -O (streaming) instead of SFTP")
    p.add_argument("--variant", action="append", required=True, type=Variant.parse)
    p.add_argument("--gateway-core", type=int, default=None, metavar="N",
                   help="the gateway on CPU N alone; this process, scp/ssh and the machine's sshd on the others "
                        "(what a gateway with a core of its own sees; direct runs on the others too)")
    args = p.parse_args()
    if args.gateway_core is not None:
        others = set(os.sched_getaffinity(0)) - {args.gateway_core}
        if not others:
            p.error("--gateway-core needs at least two CPUs")
        os.sched_setaffinity(0, others)  # scp and ssh inherit it
        os.environ["FLEETGATE_BENCH_PIN"] = f"{args.gateway_core}:{','.join(map(str, sorted(others)))}"
    if args.legacy_scp:
        SCP_OPTS.append("-O")
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="fleetgate-compare-", dir=base))
    gws: dict[str, tuple[Gateway, Ways]] = {}
    try:
        src = work / "src.bin"
        make_file(src, args.size)
        for v in args.variant:
            state = work / v.name / "state"
            state.mkdir(parents=True)
            with patched_env(v.env):
                gw = Gateway(state, v.sets, work / v.name / "gateway.log", v.script)
            ways = Ways(state, gw.port, gw.machines["alice"], getpass.getuser())
            gws[v.name] = (gw, ways)
            opts, host = ways.opts("relay", "default")
            run(["ssh", *opts, host, "true"], 120)  # wakes this variant's machine
            print(f"compare: {v.name}: gateway pid {gw.pid}, fleetgate from {gw.package}", file=sys.stderr)
        first_gw, first_ways = next(iter(gws.values()))
        dirs = args.directions.split(",")
        rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}  # (dir, name) -> (s, cpu, direct s)
        for rnd in range(args.rounds):
            for d in dirs:
                direct = transfer(first_ways, first_gw, work, src, "direct", args.cipher, d, False, 600).seconds
                for name, (gw, ways) in gws.items():
                    s = transfer(ways, gw, work, src, args.mode, args.cipher, d, rnd == 0, 600)
                    rows.setdefault((d, name), []).append((s.seconds, s.gateway_cpu, direct))
                    print(f"compare: round {rnd + 1} {d:>8} {name:>16}: {args.size / MIB / s.seconds:6.1f} MiB/s "
                          f"(direct {args.size / MIB / direct:6.1f}) cpu {s.gateway_cpu:.2f} s", file=sys.stderr)
        gib = args.size / (1024 * MIB)
        print(f"{args.rounds} rounds of {args.size // MIB} MiB, cipher {args.cipher}, mode {args.mode}, "
              f"scp {'-O (legacy protocol)' if SCP_OPTS else '(SFTP protocol)'}\n")
        print("| direction | variant | gateway CPU s/GiB (median) | vs direct (median) | vs direct (best of each) | MiB/s (median) |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for (d, name), rs in rows.items():
            cpu = statistics.median(r[1] for r in rs) / gib
            ratio = statistics.median(r[2] / r[0] for r in rs)
            best = min(r[2] for r in rs) / min(r[0] for r in rs)
            rate = args.size / MIB / statistics.median(r[0] for r in rs)
            print(f"| {d} | {name} | {cpu:.2f} | {ratio * 100:.0f} % | {best * 100:.0f} % | {rate:.0f} |")
        return 0
    finally:
        for gw, _ in gws.values():
            gw.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
