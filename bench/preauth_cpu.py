"""Gateway CPU per unauthenticated handshake, for each key exchange the front offers.

What an attacker who never authenticates can make the gateway spend: one TCP connection,
the key exchange (the front's side of it, and its host key signature), one refused
`none` authentication, close. The gateway runs in its own process (bench/gateway.py, the
demo fleet); the client is OpenSSH's `ssh` with `-o KexAlgorithms=ONE` and no way to
authenticate, run N times per key exchange, sequentially. CPU is read from
/proc/PID/task/*/schedstat (nanoseconds) of the gateway process before and after, so
other work on the machine does not count, only what the gateway did.

Group exchange is run as OpenSSH asks for it with a 256-bit cipher (min 2048, preferred
7680, max 8192 bits), which makes the front pick its 8192-bit group: the worst case.

    .venv/bin/python bench/preauth_cpu.py                 # 30 handshakes per kex, prints a table
    .venv/bin/python bench/preauth_cpu.py --count 10      # quicker
    .venv/bin/python bench/preauth_cpu.py --docs          # also writes docs/benchmarks.md's section
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from relay import Gateway, write_docs  # noqa: E402

KEXES = (
    "curve25519-sha256",
    "mlkem768x25519-sha256",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group14-sha256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group-exchange-sha256",
)


def gateway_cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def supported_by_client(kex: str) -> bool:
    out = subprocess.run(["ssh", "-Q", "kex"], capture_output=True, text=True, check=True).stdout.split()
    return kex in out


def handshake(port: int, kex: str | None, known_hosts: Path, cipher: str | None = "aes256-gcm@openssh.com",
              verbose: bool = False) -> str:
    argv = ["ssh", "-F", "/dev/null", "-p", str(port), *(["-o", f"KexAlgorithms={kex}"] if kex else []),
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=no",
            "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no", "-o", "PasswordAuthentication=no",
            "-o", "KbdInteractiveAuthentication=no", "-o", "GSSAPIAuthentication=no",
            "-o", "ConnectTimeout=20", *(["-c", cipher] if cipher else []),
            "-o", "LogLevel=DEBUG1" if verbose else "LogLevel=ERROR",
            "nobody@127.0.0.1", "true"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return r.stderr


def measure(count: int, kexes: list[str]) -> list[tuple[str, float, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fg-preauth-") as tmp:
        state = Path(tmp) / "fleet"
        # A budget that never refuses: this measures the cost, not the limit.
        gw = Gateway(state, ["limits.expensive_kex_per_second=100000",
                             "limits.expensive_kex_per_source_per_minute=1000000",
                             "limits.penalty_after=1000000"])
        try:
            kh = Path(tmp) / "known_hosts"
            handshake(gw.port, "curve25519-sha256", kh)  # warm up (imports, first connection)
            for kex in kexes:
                per = []
                client = children_cpu()
                for _ in range(count):
                    before = gateway_cpu_ns(gw.pid)
                    err = handshake(gw.port, kex, kh)
                    if "Permission denied" not in err:
                        raise SystemExit(f"{kex}: expected a refused login, got: {err.strip()}")
                    per.append((gateway_cpu_ns(gw.pid) - before) / 1e6)
                client = (children_cpu() - client) * 1000 / count
                rows.append((kex, statistics.median(per), statistics.quantiles(per, n=10)[-1], client))
                print(f"{kex:40s} gateway {statistics.median(per):6.2f} ms (p90 {rows[-1][2]:6.2f})  "
                      f"ssh client {client:6.2f} ms", flush=True)
        finally:
            gw.close()
    return rows


def steering(count: int) -> list[tuple[str, str, float, float]]:
    """A default OpenSSH client (its own cipher preference) against the default front
    (steered after reading the client's KEXINIT) and a front with pinned AES-GCM (sends
    its KEXINIT at once, the former default): cipher negotiated, handshake wall time."""
    import re
    out = []
    with tempfile.TemporaryDirectory(prefix="fg-steer-") as tmp:
        gws = {"steered (default)": Gateway(Path(tmp) / "a", ["limits.penalty_after=1000000"]),
               "pinned AES-GCM, no wait": Gateway(Path(tmp) / "b", [
                   'gateway.ciphers=["aes128-gcm@openssh.com","aes256-gcm@openssh.com"]',
                   "limits.penalty_after=1000000"]),
               "OpenSSH's list, no wait": Gateway(Path(tmp) / "c", ["gateway.kexinit_wait=0",
                                                                     "limits.penalty_after=1000000"])}
        try:
            kh = Path(tmp) / "known_hosts"
            times: dict[str, list[float]] = {name: [] for name in gws}
            ciphers: dict[str, str] = {}
            for name, gw in gws.items():
                err = handshake(gw.port, None, kh, cipher=None, verbose=True)
                m = re.search(r"kex: server->client cipher: (\S+)", err)
                ciphers[name] = m.group(1) if m else "?"
            for _ in range(count):
                for name, gw in gws.items():
                    t0 = time.perf_counter()
                    handshake(gw.port, None, kh, cipher=None)
                    times[name].append((time.perf_counter() - t0) * 1000)
            for name in gws:
                out.append((name, ciphers[name], statistics.median(times[name]),
                            statistics.quantiles(times[name], n=10)[-1]))
                print(f"{name:28s} {ciphers[name]:32s} {out[-1][2]:7.1f} ms", flush=True)
        finally:
            for gw in gws.values():
                gw.close()
    return out


def report(rows: list[tuple[str, float, float, float]], count: int, command: str,
           steer: list[tuple[str, str, float, float]] = ()) -> str:
    base = next((r[1] for r in rows if r[0] == "curve25519-sha256"), None)
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node() or 'host'}: "
        f"{os.cpu_count()} cores, CPython {platform.python_version()}, "
        f"{subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.strip()}.",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Gateway CPU per unauthenticated handshake (TCP connect, key exchange, host key signature, a refused "
        f"`none` authentication), {count} sequential OpenSSH `ssh` connections per key exchange; "
        f"median and p90 in ms of the gateway process's CPU (schedstat), and the `ssh` client's CPU for comparison "
        f"(an attacker need not compute its side of a Diffie-Hellman exchange at all).",
        "",
        "| key exchange | gateway ms (median) | p90 | vs curve25519 | ssh client ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kex, med, p90, client in rows:
        ratio = f"{med / base:.1f}×" if base else "—"
        lines.append(f"| {kex} | {med:.2f} | {p90:.2f} | {ratio} | {client:.2f} |")
    if steer:
        lines += ["", f"A default OpenSSH client (no `-c`): the cipher it negotiates with the front, and the "
                      f"wall time of `ssh` until its refused login, {count} runs per front, interleaved. "
                      f"Over loopback; on a real network, steering adds at most one round trip (the front's "
                      f"KEXINIT now follows the client's).", "",
                  "| front | cipher negotiated | handshake ms (median) | p90 |", "| --- | --- | ---: | ---: |"]
        for name, cipher, med, p90 in steer:
            lines.append(f"| {name} | {cipher} | {med:.1f} | {p90:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=30, help="handshakes per key exchange (default 30)")
    p.add_argument("--kex", action="append", help="only this key exchange (repeatable)")
    p.add_argument("--docs", action="store_true", help="write the results into docs/benchmarks.md")
    args = p.parse_args(argv)
    kexes = [k for k in (args.kex or KEXES) if supported_by_client(k)]
    rows = measure(args.count, kexes)
    steer = steering(args.count)
    command = ".venv/bin/python bench/preauth_cpu.py" + (f" --count {args.count}" if args.count != 30 else "")
    text = report(rows, args.count, command, steer)
    print(text)
    if args.docs:
        _write_section(HERE.parent / "docs" / "benchmarks.md", "preauth", text)
    return 0


def _write_section(path: Path, name: str, text: str) -> None:
    write_docs(path, text, f"<!-- bench:{name}:begin (written by bench/preauth_cpu.py; edit outside these markers) -->",
               f"<!-- bench:{name}:end -->", heading="## Pre-authentication CPU per key exchange")

if __name__ == "__main__":
    sys.exit(main())
