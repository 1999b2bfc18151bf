"""Every benchmark of issue 15's table, one after the other, in one command.

    ./scripts/bench.sh --all            # full runs, each writing its section of docs/benchmarks.md
    ./scripts/bench.sh --all --quick    # smaller runs (relay 256 MiB ×1 …), docs left alone
    ./scripts/bench.sh --all --only relay,wake --no-docs
    ./scripts/bench.sh --all --dry-run  # the commands it would run

Why one command: the results in docs/benchmarks.md are only comparable when they come from
the same code on the same machine on the same day; running each script by hand invites
a stale row. The steps run in sequence (never in parallel: each one measures CPU and
latency on the same few cores), a failed step does not stop the others, and the exit
status is non-zero if any step failed.

A step whose script does not exist (yet) is skipped. Options are passed to a script only
if its `--help` mentions them, so a step keeps working while its script's flags change;
STEPS below is the table to adjust.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOCS = "docs/benchmarks.md"


@dataclass(frozen=True)
class Step:
    """One benchmark: its script under bench/ and its options.

    Options are (flag, value) pairs, value None for a switch. `docs` is the flag that makes
    the script write its section of docs/benchmarks.md; `full` and `quick` are the options
    of a full and of a --quick run.
    """

    name: str
    script: str
    docs: tuple[tuple[str, str | None], ...] = (("--write-docs", None),)
    full: tuple[tuple[str, str | None], ...] = ()
    quick: tuple[tuple[str, str | None], ...] = ()


STEPS: tuple[Step, ...] = (
    Step("relay", "relay.py", docs=(("--docs", DOCS),),
         full=(("--size", "1GiB"), ("--repeat", "3")),
         quick=(("--size", "256MiB"), ("--repeat", "1"), ("--latency-runs", "5"), ("--wake-runs", "2"))),
    Step("passthrough", "passthrough.py",
         full=(("--size", "1GiB"), ("--repeat", "3")),
         quick=(("--size", "256MiB"), ("--repeat", "1"))),
    Step("wake", "wake.py", quick=(("--runs", "5"),)),
    Step("scale", "scale.py",
         quick=(("--machines", "1000"), ("--scrapes", "5"), ("--healthz", "10"), ("--logins", "3"),
                ("--idle-seconds", "5"), ("--poll-seconds", "10"))),
    Step("sessions", "sessions.py", quick=(("--sessions", "200,1000"), ("--login-seconds", "5"))),
    # An A/B tool without a docs section: run on the working tree as one variant.
    Step("jump_sshd", "jump_sshd.py", docs=(),
         full=(("--variant", "current"),), quick=(("--variant", "current"), ("--logins", "10"))),
)


def known_flags(script: Path) -> set[str]:
    """The words of the script's --help: its flags among them (empty if --help fails)."""
    p = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    return set(p.stdout.replace("=", " ").replace(",", " ").split()) if p.returncode == 0 else set()


def accepted(known: set[str], options: tuple[tuple[str, str | None], ...]) -> tuple[list[str], list[str]]:
    """The argv for the options among `known`, and the flags left out."""
    argv: list[str] = []
    dropped: list[str] = []
    for flag, value in options:
        if flag in known:
            argv += [flag] if value is None else [flag, value]
        else:
            dropped.append(flag)
    return argv, dropped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smaller runs (relay 256 MiB ×1, fewer runs elsewhere); implies --no-docs")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument("--dry-run", action="store_true", help="print each step's command, run nothing")
    p.add_argument("--only", type=lambda s: s.split(","), metavar="NAMES",
                   help="comma-separated subset of " + ",".join(s.name for s in STEPS))
    args = p.parse_args(argv)
    unknown = set(args.only or ()) - {s.name for s in STEPS}
    if unknown:
        p.error(f"--only: unknown step(s) {', '.join(sorted(unknown))}")
    write_docs = not (args.quick or args.no_docs)
    command = os.environ.get("FLEETGATE_BENCH_COMMAND") or shlex.join(
        ["python", "bench/all.py", *(argv if argv is not None else sys.argv[1:])])

    results: list[tuple[str, str, float]] = []  # (name, outcome, seconds)
    for step in STEPS:
        if args.only and step.name not in args.only:
            continue
        script = HERE / step.script
        if not script.exists():
            print(f"all: {step.name}: bench/{step.script} does not exist, skipped", file=sys.stderr, flush=True)
            results.append((step.name, "skipped (no script)", 0.0))
            continue
        options = (step.quick if args.quick else step.full) + (step.docs if write_docs else ())
        known = known_flags(script)
        step_argv, dropped = accepted(known, options)
        if dropped:
            print(f"all: {step.name}: bench/{step.script} does not take {', '.join(dropped)}; left out",
                  file=sys.stderr, flush=True)
        if not write_docs and "--no-docs" in known:
            step_argv.append("--no-docs")  # relay.py writes the docs by default for a 1 GiB run
        cmd = [sys.executable, f"bench/{step.script}", *step_argv]
        shown = shlex.join([".venv/bin/python", *cmd[1:]])
        print(f"all: {step.name}: {shown}", file=sys.stderr, flush=True)
        if args.dry_run:
            continue
        # What the step records as its command: the one command that ran it, and its own part.
        env = {**os.environ, "FLEETGATE_BENCH_COMMAND": f"{command}   # this step: {shown}"}
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
        except KeyboardInterrupt:
            rc = 130
        dt = time.monotonic() - t0
        outcome = f"exit {rc}"
        results.append((step.name, outcome, dt))
        print(f"all: {step.name}: {outcome} after {dt:.0f} s", file=sys.stderr, flush=True)
        if rc == 130:
            break

    if args.dry_run:
        return 0
    print("\nall: summary", file=sys.stderr)
    for name, outcome, dt in results:
        print(f"all:   {name:<12} {outcome:<20} {dt:7.0f} s", file=sys.stderr)
    failed = [name for name, outcome, _ in results if outcome.startswith("exit") and outcome != "exit 0"]
    if failed:
        print(f"all: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
