"""Says whether pyproject.toml and requirements.lock agree, with no network and no venv.

Why a script of its own: setup.sh must refuse a stale lock before it installs anything, on a
fresh machine where only Debian's python3 exists, so this uses the standard library alone.
The lock agrees when every dependency pyproject.toml names (runtime, `test` and `dev` extras,
for Python 3.11 on Linux) is pinned there at a version its range allows, and every pin is
wanted by pyproject.toml or by another pin (no leftovers of a removed dependency).
Exit 0 and no output when they agree; exit 1 with one line per disagreement otherwise.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("test", "dev")


def normalize(name: str) -> str:
    """PEP 503 names, so `trio_asyncio` and `trio-asyncio` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Pins and, for each pin, the names its `# via` comment gives."""
    pins: dict[str, str] = {}
    via: dict[str, set[str]] = {}
    current = ""
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ \\;]+)", line)
        if m:
            current = normalize(m.group(1))
            pins[current] = m.group(2)
            via[current] = set()
            continue
        m = re.match(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if current and m and m.group(1) != "via":
            via[current].add(normalize(m.group(1)))
    return pins, via


def wanted(project: dict) -> list[str]:
    reqs = list(project.get("dependencies", []))
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def marker_applies(marker: str) -> bool:
    """Only the markers pyproject.toml uses: python_version comparisons (we lock for 3.11)."""
    m = re.fullmatch(r"\s*python_version\s*(<=|>=|<|>|==|!=)\s*['\"](\d+)\.(\d+)['\"]\s*", marker)
    if not m:
        raise SystemExit(f"lockcheck: pyproject.toml: marker {marker!r} is not understood here")
    ours, theirs = (3, 11), (int(m.group(2)), int(m.group(3)))
    return {"<": ours < theirs, "<=": ours <= theirs, ">": ours > theirs, ">=": ours >= theirs,
            "==": ours == theirs, "!=": ours != theirs}[m.group(1)]


def version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.+]", v))


def allows(spec: str, version: str) -> bool:
    """The comparisons pyproject.toml uses (>=, <, <=, >, ==, !=), on release numbers."""
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = re.fullmatch(r"(<=|>=|<|>|==|!=)\s*([0-9][0-9A-Za-z.+]*)", clause)
        if not m:
            raise SystemExit(f"lockcheck: pyproject.toml: version range {clause!r} is not understood here")
        op, bound = m.groups()
        a, b = version_key(version), version_key(bound)
        n = max(len(a), len(b))
        a = tuple(list(a) + [0] * (n - len(a)))
        b = tuple(list(b) + [0] * (n - len(b)))
        ok = {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]
        if not ok:
            return False
    return True


def problems(pyproject: Path = ROOT / "pyproject.toml", lock: Path = ROOT / "requirements.lock") -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    if not lock.exists():
        return [f"{lock.name} is missing: run ./scripts/lock.sh"]
    pins, via = read_lock(lock)
    out: list[str] = []
    direct: set[str] = set()
    for req in wanted(project):
        req, _, marker = req.partition(";")
        if marker and not marker_applies(marker):
            continue
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*?)\s*", req)
        name, spec = normalize(m.group(1)), m.group(2)
        direct.add(name)
        if name not in pins:
            out.append(f"pyproject.toml needs {req.strip()}, which {lock.name} does not pin")
        elif not allows(spec, pins[name]):
            out.append(f"pyproject.toml needs {req.strip()}, {lock.name} pins {name}=={pins[name]}")
    name = normalize(project["name"])
    for pin, sources in sorted(via.items()):
        if pin in direct:
            continue
        if not (sources & set(pins)) - {pin}:
            out.append(f"{lock.name} pins {pin}=={pins[pin]}, which nothing in pyproject.toml needs any more")
    if name in pins:
        out.append(f"{lock.name} pins {name} itself")
    runtime = lock.with_name("requirements-runtime.lock")
    if not runtime.exists():
        out.append(f"{runtime.name} is missing")
    else:
        rpins, _ = read_lock(runtime)
        for pin, version in sorted(rpins.items()):
            if pins.get(pin) != version:
                out.append(f"{runtime.name} pins {pin}=={version}, {lock.name} {pins.get(pin, 'nothing')}")
        for req in project.get("dependencies", []):
            req, _, marker = req.partition(";")
            rname = normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))
            if (not marker or marker_applies(marker)) and rname not in rpins:
                out.append(f"{runtime.name} lacks the runtime dependency {rname}")
    return out


def main() -> int:
    found = problems()
    for line in found:
        print(f"lockcheck: {line}; refresh with ./scripts/lock.sh", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
