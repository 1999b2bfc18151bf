"""What process-backend isolation costs a wake: start → the machine's SSH banner, both modes.

    .venv/bin/python bench/process_wake.py [--runs 20]

Runs the process backend directly (no gateway, no client) on a demo fleet in a temporary
directory, as root: `isolation = "none"` against `isolation = "namespaces"`, alternating,
and prints the median and p90 of each, and of one upstream connect (socket into the
machine's namespace + SSH banner) once it is up. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetgate import config as config_mod, demo, probe  # noqa: E402
from fleetgate.app import build_backends  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def one_mode(d: Path, isolation: str, runs: int) -> tuple[list[float], list[float]]:
    doc = tomllib.loads((d / "fleetgate.toml").read_text())
    doc["backends"]["local"]["isolation"] = isolation
    if isolation == "none":
        doc["machines"]["alice"]["user"] = "root"
    cfg = config_mod.parse(doc, file=str(d / "fleetgate.toml"), base_dir=d)
    backend = build_backends(cfg)["local"]
    mc = cfg.machines["alice"]
    wakes, connects = [], []
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        for _ in range(runs):
            t0 = time.perf_counter()
            await backend.start(mc)
            with trio.fail_after(30):
                # Polled every 5 ms, as the gateway's probe does during a wake's first 50 ms
                # (bench/wake.py measures what the gateway adds on top of this).
                while await probe.read_banner(await backend.address(mc)) is None:
                    await trio.sleep(0.005)
            wakes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with trio.fail_after(10):
                assert await probe.read_banner(await backend.address(mc))
            connects.append(time.perf_counter() - t0)
            await backend.stop(mc)
        nursery.cancel_scope.cancel()
    return wakes, connects


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        demo.prepare(d, 0, None)
        res: dict[str, tuple[list[float], list[float]]] = {"none": ([], []), "namespaces": ([], [])}
        for _ in range(runs):  # alternate, so both modes see the same load
            for mode in res:
                w, c = await one_mode(d, mode, 1)
                res[mode][0].extend(w)
                res[mode][1].extend(c)
    for mode, (w, c) in res.items():
        print(f"isolation={mode:10s} start→banner median {statistics.median(w) * 1000:.0f} ms "
              f"p90 {pct(w, 0.9) * 1000:.0f} ms; connect+banner median {statistics.median(c) * 1000:.1f} ms "
              f"({len(w)} runs)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    trio.run(main, p.parse_args().runs)
