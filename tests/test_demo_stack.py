"""`fleetgate demo --monitoring` (issue 14): the demo with Prometheus, Alertmanager and a webhook receiver.

The e2e test runs the demo as a user does, breaks the documented machine (`alice+broken`) and
waits for the printed notification; the unit tests check the pieces without sockets.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import trio

from fleetgate import demo, demo_stack
from fleetgate.config import load
from helpers import DemoProcess, run
from prom_helpers import ALERTS


def test_broken_machine_is_only_in_the_monitoring_demo(tmp_path, monkeypatch) -> None:
    ports = iter(range(40000, 40100))
    monkeypatch.setattr(demo, "_free_port", lambda: next(ports))  # no socket outside the e2e tier
    plain = load(demo.prepare(tmp_path / "plain", 2222, 9180))
    assert "broken" not in plain.machines and plain.users["alice"].machines == ("alice",)
    cfg = load(demo.prepare(tmp_path / "mon", 2222, 9180, broken=True))
    assert cfg.machines["broken"].backend == "broken" and cfg.users["alice"].machines == ("alice", "broken")
    assert cfg.backends["broken"].options["sshd"] == "/bin/false"
    assert cfg.machines["broken"].options["port"] != cfg.machines["alice"].options["port"]


def test_configs_use_the_shipped_rules_and_alertmanager_example(tmp_path) -> None:
    prom, am = demo_stack.write_configs(tmp_path, demo_stack.find_assets(), 9180, 9090, 9093, 5001)
    p = json.loads(prom.read_text())
    assert p["rule_files"] == [str(ALERTS / "fleetgate.rules.yml")]
    assert p["scrape_configs"][0] == {"job_name": "fleetgate", "static_configs": [{"targets": ["127.0.0.1:9180"]}]}
    text = am.read_text()
    assert "http://127.0.0.1:5001/pager" in text and "http://127.0.0.1:5001/default" in text
    assert "FleetgateDown" in text, "the example's inhibition is kept"


def test_receiver_prints_one_line_per_alert() -> None:
    payload = {"alerts": [{"status": "firing", "labels": {
        "alertname": "FleetgateWakeFailures", "severity": "warning", "job": "fleetgate", "instance": "x:1",
        "backend": "broken", "reason": "start_error"}, "annotations": {"description": "1 wake(s) failed."}}]}
    assert demo_stack.notification_lines("default", payload) == [
        "alertmanager -> default: FIRING FleetgateWakeFailures (warning) backend=broken reason=start_error: "
        "1 wake(s) failed."]


@pytest.mark.e2e
async def test_demo_monitoring_notifies_when_a_machine_is_broken(tmp_path) -> None:
    async with DemoProcess(tmp_path / "demo", "--monitoring") as d:
        prom = re.search(r"Prometheus\s+(http://127\.0\.0\.1:\d+)", d.banner).group(1)
        assert re.search(r"Alertmanager\s+http://127\.0\.0\.1:\d+", d.banner), d.banner
        assert "alice+broken@127.0.0.1" in d.banner and "dashboards/fleetgate.json" in d.banner
        async with httpx.AsyncClient(timeout=5) as client:
            with trio.fail_after(60):  # Prometheus scrapes the demo (counters at 0 before they move)
                while True:
                    try:
                        r = await client.get(f"{prom}/api/v1/query", params={"query": 'up{job="fleetgate"} == 1'})
                        if r.status_code == 200 and r.json()["data"]["result"]:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.5)
            rules = (await client.get(f"{prom}/api/v1/rules")).json()
            names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
            assert {"FleetgateWakeFailures", "FleetgateWakeErrorBudgetBurn"} <= names
        r = await run(["ssh", *d.ssh_opts(), "alice+broken@127.0.0.1", "true"])
        assert r.returncode == 255 and "could not be started" in r.err, r.err
        out = b""  # what the demo printed after its banner (which shows an example of the line)
        assert d.proc is not None and d.proc.stdout is not None
        with trio.fail_after(60):
            while b"\nalertmanager -> default: FIRING FleetgateWakeFailures" not in b"\n" + out:
                chunk = await d.proc.stdout.receive_some(4096)
                assert chunk, out.decode()
                out += chunk
        [line] = [ln for ln in out.decode().splitlines() if ln.startswith("alertmanager -> default: FIRING")]
        assert line.startswith("alertmanager -> default: ") and "backend=broken reason=start_error" in line, line
