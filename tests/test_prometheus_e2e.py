"""End to end: a real fleetgate, scraped by a real Prometheus with our rules, alerting through a
real Alertmanager with our routing to a webhook started here.

One gateway serves two machines: bob's works, alice's backend points `sshd` at /bin/false, so
every wake of alice fails with start_error. A second gateway is scraped too, and stopped once
Prometheus has seen it; Prometheus also scrapes itself (another job, as in real set-ups). The
real OpenSSH client logs in as bob (a wake, a session, relayed bytes), as alice (a failed wake,
then a cooldown refusal) and with a wrong key (an auth failure). Then:

- bob's `rekeyed` machine has a host key that is not the pinned one, so three logins there fail
  upstream: the login SLI recording rule moves and FleetgateLoginFailures goes pending (defect 4);
  bob's `api5xx` machine is on an HTTP backend whose API answers 503: the wake fails as
  backend_error, not backend_unreachable, and all 3 attempts are counted by status class (defect 3);
- FleetgateWakeFailures reaches the default receiver with the right labels and runbook link,
  and that one failed wake pages nobody: FleetgateWakeErrorBudgetBurn is neither firing nor
  pending (the quiet-fleet minimum of 3 failures, issue 14);
- every dashboard panel query and variable query returns data from this Prometheus, the variables
  expanded as Grafana does ("All" is the listed values); the "Gateways up / down" panel shows one
  up and one down, not counting Prometheus's own target;
- the series issue 14 added are there: process_*, build_info's revision and versions, wakes by cause,
  backend_error pre-initialised;
- `promtool check metrics` is clean on the gateway's real /metrics;
- Alertmanager inhibits a gateway's alerts while FleetgateDown fires for it.

Prometheus loads the shipped rules file unchanged (the rules this test needs have no `for:`);
only its scrape and evaluation intervals (1 s) and Alertmanager's group_wait/group_interval (1 s)
are shortened so the test takes seconds, not minutes. Prometheus needs ~5 s for its first scrape.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import h11
import httpx
import pytest
import trio
import yaml

from helpers import Fleet, free_port, make_fleet, run, sample, start_gateway
from prom_helpers import (ALERTMANAGER, LABEL_VALUES, METRICS_DOC, RULES, RUNBOOK_BASE, grafana_regex_value,
                          interpolate, load_dashboard, load_yaml, panel_queries, query_variables, variable_query)

pytestmark = pytest.mark.e2e

RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval is at most for a 1 s scrape interval
# Panels of series this fleet cannot have (none since it has an HTTP backend too).
NO_DATA_HERE: set = set()


@dataclass
class Hook:
    path: str
    payload: dict


@dataclass
class Webhook:
    """The receiver Alertmanager posts to: a small h11 server on a trio listener."""

    hooks: list[Hook] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        target, body = "", b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    target, body = event.target.decode(), b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.hooks.append(Hook(target, json.loads(body)))
                    self.changed.set()
                    self.changed = trio.Event()
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("content-length", "0")])))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                else:  # ConnectionClosed or PAUSED after a close
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return

    async def wait_for(self, match: Callable[[Hook, dict], bool], timeout: float) -> tuple[Hook, dict]:
        """The first alert (in any notification so far or to come) that `match` accepts."""
        with trio.fail_after(timeout):
            while True:
                for hook in self.hooks:
                    for alert in hook.payload["alerts"]:
                        if match(hook, alert):
                            return hook, alert
                await self.changed.wait()


async def wait_http_ok(client: httpx.AsyncClient, url: str, timeout: float) -> None:
    """Poll a process's readiness endpoint: it has no way to tell us otherwise."""
    with trio.fail_after(timeout):
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.2)


async def prom_query(client: httpx.AsyncClient, base: str, expr: str) -> list[dict]:
    r = await client.get(f"{base}/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def broken_alice(doc: dict) -> None:
    """alice's machine gets a backend whose sshd is /bin/false: its start fails with start_error."""
    doc["backends"]["broken"] = {"type": "process", "sshd": "/bin/false"}
    doc["machines"]["alice"]["backend"] = "broken"
    doc["metrics"] = {"listen": "127.0.0.1:0"}


def troubled_bob(api_port: int) -> Callable[[dict], None]:
    """bob may also use `rekeyed` (its sshd's key is not the pinned one: every login there fails
    upstream, after the wake) and `api5xx` (an HTTP backend whose API answers 503)."""
    def patch(doc: dict) -> None:
        broken_alice(doc)
        bob = doc["machines"]["bob"]
        doc["machines"]["rekeyed"] = {**bob, "port": free_port(), "host_key": doc["machines"]["alice"]["host_key"]}
        doc["backends"]["api"] = {"type": "http", "start_url": f"http://127.0.0.1:{api_port}/start_vm",
                                  "timeout": 2, "retries": 2, "backoff": 0.05}
        doc["machines"]["api5xx"] = {"backend": "api", "user": bob["user"], "host_key": bob["host_key"],
                                     "ssh_port": free_port(), "boot_timeout": 30}
        doc["users"]["bob"]["machines"] = ["bob", "rekeyed", "api5xx"]
    return patch


async def answer_503(stream: trio.SocketStream) -> None:
    """A VM API that is up but failing: every request gets HTTP 503."""
    conn = h11.Connection(h11.SERVER)
    with trio.move_on_after(10):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.EndOfMessage):
                await stream.send_all(conn.send(h11.Response(status_code=503, headers=[("content-length", "0"),
                                                                                         ("connection", "close")])))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                return
            elif event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return


async def start_process(nursery: trio.Nursery, argv: list[str], log: Path) -> None:
    with open(log, "wb") as f:
        await nursery.start(lambda task_status: trio.run_process(
            argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, check=False, task_status=task_status))


async def start_alertmanager(nursery: trio.Nursery, tmp: Path, webhook_port: int) -> str:
    cfg = load_yaml(ALERTMANAGER)
    for receiver in cfg["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"http://127.0.0.1:{webhook_port}/{receiver['name']}"
    cfg["route"]["group_wait"] = cfg["route"]["group_interval"] = "1s"
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    (tmp / "am-data").mkdir()
    await start_process(nursery, [
        "prometheus-alertmanager", f"--config.file={tmp / 'alertmanager.yml'}", f"--storage.path={tmp / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn",
    ], tmp / "alertmanager.log")
    return f"http://127.0.0.1:{port}"


async def start_prometheus(nursery: trio.Nursery, tmp: Path, targets: list[str], alertmanager: str) -> str:
    port = free_port()
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager.split("//", 1)[1]]}]}]},
        "scrape_configs": [{"job_name": "fleetgate", "static_configs": [{"targets": targets}]},
                           {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config))
    await start_process(nursery, [
        "prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'prom-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ], tmp / "prometheus.log")
    return f"http://127.0.0.1:{port}"


async def make_traffic(fleet: Fleet) -> None:
    r = await run(fleet.ssh("bob", "echo hello from bob"))
    assert r.returncode == 0 and r.out == "hello from bob\n", r.err
    for _ in range(3):  # logins that reach a running machine and fail there (defect 4: the login SLI)
        r = await run(fleet.ssh("bob+rekeyed", "true"))
        assert r.returncode == 255 and "host key of rekeyed changed" in r.err, r.err
    r = await run(fleet.ssh("bob+api5xx", "true"))  # defect 3: an API answering 5xx is backend_error
    assert r.returncode != 0 and "could not be started" in r.err, r.err
    r = await run(fleet.ssh("alice", "true"))
    assert r.returncode != 0 and "could not be started" in r.err, r.err
    r = await run(fleet.ssh("alice", "true"))  # within the cooldown: refused without a new start
    assert r.returncode != 0, r.err
    wrong_key = fleet.ssh("bob", "true")
    wrong_key[wrong_key.index("-i") + 1] = str(fleet.dir / "upstream_key")  # the gateway's, not a user's
    r = await run(wrong_key)
    assert r.returncode == 255 and "Permission denied" in r.err, r.err


async def test_alerts_dashboard_and_metrics_against_real_prometheus(tmp_path: Path, nursery: trio.Nursery) -> None:
    t0 = trio.current_time()
    webhook = Webhook()
    [listener] = await nursery.start(partial(trio.serve_tcp, webhook.handle, 0, host="127.0.0.1"))
    webhook_port = listener.socket.getsockname()[1]
    [api_listener] = await nursery.start(partial(trio.serve_tcp, answer_503, 0, host="127.0.0.1"))
    fleet, cfg = make_fleet(tmp_path, patch=troubled_bob(api_listener.socket.getsockname()[1]))
    running = await start_gateway(nursery, fleet, cfg, stop_machines_on_exit=True)
    instance = f"127.0.0.1:{running.metrics_port}"
    fleet2, cfg2 = make_fleet(tmp_path / "gw2", patch=lambda doc: doc.update(metrics={"listen": "127.0.0.1:0"}))
    running2 = await start_gateway(nursery, fleet2, cfg2, stop_machines_on_exit=True)
    instance2 = f"127.0.0.1:{running2.metrics_port}"
    am = await start_alertmanager(nursery, tmp_path, webhook_port)
    prom = await start_prometheus(nursery, tmp_path, [instance, instance2], am)

    async with httpx.AsyncClient(timeout=10) as client:
        await wait_http_ok(client, f"{am}/-/ready", 30)
        await wait_http_ok(client, f"{prom}/-/ready", 30)
        # Counters must be scraped at 0 before they move, or rate() and increase() see nothing.
        with trio.fail_after(30):
            while len(await prom_query(client, prom, 'up == 1')) < 3:  # both gateways and Prometheus
                await trio.sleep(0.25)
        running2.shutdown.set()  # the second gateway goes away: the dashboard must show it down
        ready_at = trio.current_time()
        await make_traffic(fleet)
        assert fleet.metric("fleetgate_wake_failures_total", backend="broken", reason="start_error") == 1

        # -- the wake-failure alert at the default receiver, the budget burn at the pager --------
        hook, alert = await webhook.wait_for(
            lambda h, a: a["labels"]["alertname"] == "FleetgateWakeFailures" and a["status"] == "firing"
            and a["labels"].get("backend") == "broken", 45)
        assert hook.path == "/default" and hook.payload["receiver"] == "default"
        assert alert["labels"] == {"alertname": "FleetgateWakeFailures", "severity": "warning", "job": "fleetgate",
                                   "instance": instance, "backend": "broken", "reason": "start_error"}
        assert alert["annotations"]["runbook_url"] == f"{RUNBOOK_BASE}#fleetgatewakefailures"
        assert re.fullmatch(rf"\d+ wake\(s\) on backend broken failed with reason start_error on {re.escape(instance)} "
                            r"in the last 10 minutes; the users waiting for those machines could not log in\.",
                            alert["annotations"]["description"]), alert["annotations"]["description"]
        alerted_at = trio.current_time()
        # One failed wake on a quiet fleet is that one ticket, no page (issue 14, defect 2): the burn-rate
        # condition needs 3 failures, so it is not even pending, although the ratio is 100%.
        ratio = await prom_query(client, prom, 'fleetgate:wake_errors:ratio_rate5m{backend="broken"}')
        assert ratio and float(ratio[0]["value"][1]) == 1.0, ratio
        assert not await prom_query(client, prom, 'ALERTS{alertname="FleetgateWakeErrorBudgetBurn"}')
        assert not [h for h in webhook.hooks if h.path == "/pager"], "one failed wake must not page"
        with trio.fail_after(30):  # the stopped gateway: Prometheus sees it down after a failed scrape
            while not await prom_query(client, prom, f'up{{job="fleetgate",instance="{instance2}"}} == 0'):
                await trio.sleep(0.25)

        # -- defect 3: an API that answers 5xx is an error answer, every attempt counted ------------
        with trio.fail_after(30):
            while not await prom_query(client, prom, 'fleetgate_wake_failures_total{backend="api",reason="backend_error"} > 0'):
                await trio.sleep(0.25)
        attempts = await prom_query(client, prom, 'fleetgate_backend_requests_total{backend="api",status_class="5xx"}')
        assert attempts and float(attempts[0]["value"][1]) == 3.0, attempts  # 1 try + 2 retries, all seen
        assert not await prom_query(
            client, prom, 'fleetgate_wake_failures_total{backend="api",reason="backend_unreachable"} > 0')
        # -- defect 4: logins failing at a running machine move the login SLI and its alert --------
        with trio.fail_after(30):
            while not await prom_query(client, prom, 'fleetgate:login_errors:ratio_rate30m > 0.1'):
                await trio.sleep(0.25)
        with trio.fail_after(30):  # 3 failures of 4 logins: pending for its 10 minutes, not yet firing
            while not await prom_query(client, prom, 'ALERTS{alertname="FleetgateLoginFailures",alertstate="pending"}'):
                await trio.sleep(0.25)

        # -- every dashboard query against this Prometheus ---------------------------------------
        dash = load_dashboard()
        values: dict[str, str] = {}
        for var in query_variables(dash):
            m = LABEL_VALUES.match(variable_query(var))
            assert m, variable_query(var)
            params = {"match[]": interpolate(m.group("match"), values)} if m.group("match") else {}
            r = await client.get(f"{prom}/api/v1/label/{m.group('label')}/values", params=params)
            got = r.json()
            assert r.status_code == 200 and got["status"] == "success", got
            expected = {"job": ["fleetgate"], "instance": sorted([instance, instance2])}[var["name"]]
            assert sorted(got["data"]) == expected, (var["name"], got)
            # "All", as Grafana expands it: allValue if set, else the listed values as a regex alternation.
            values[var["name"]] = var.get("allValue") or "(" + "|".join(map(grafana_regex_value, got["data"])) + ")"
        values.update({"__rate_interval": RATE_INTERVAL, "__interval": "15s", "__range": "1h"})
        results = {}
        for title, ref, expr in panel_queries(dash):
            results[(title, ref)] = result = await prom_query(client, prom, interpolate(expr, values))
            assert result or (title, ref) in NO_DATA_HERE, \
                f"panel {title!r} query {ref} returned no data: {interpolate(expr, values)}"
        gateways = [float(results[("Gateways up / down", ref)][0]["value"][1]) for ref in ("A", "B")]
        assert gateways == [1.0, 1.0], f"one gateway up, one down, Prometheus not counted: {gateways}"
        causes = {s["metric"]["cause"] for s in results[("Wakes by cause", "A")]}
        assert causes == {"login", "keep_awake", "schedule", "passthrough"}, causes
        failures = {(s["metric"].get("backend"), s["metric"].get("reason")): float(s["value"][1])
                    for s in results[("Wake failures by reason", "A")]}
        assert failures[("broken", "start_error")] > 0 and failures[("local", "start_error")] == 0
        boot = {s["metric"]["backend"]: float(s["value"][1]) for s in results[("Boot latency p50 / p95", "B")]}
        assert 0 < boot["local"] < 30, boot
        errors = {(s["metric"]["backend"], s["metric"]["op"]) for s in results[("Backend call errors", "A")]}
        assert ("broken", "start") in errors
        auth = {s["metric"]["method"]: float(s["value"][1]) for s in results[("Auth failures by method", "A")]}
        assert auth["publickey"] > 0 and auth["password"] == 0, auth

        # -- promtool on the gateway's own exposition ----------------------------------------------
        exposition = (await client.get(f"http://{instance}/metrics")).content
    text = exposition.decode()
    assert sample(text, "process_open_fds") and sample(text, "process_resident_memory_bytes")
    assert re.search(r'^fleetgate_build_info\{asyncssh="[^"]+",python="[^"]+",revision="[^"]+",version="[^"]+"\} 1',
                     text, re.M), "build_info: version, revision, Python and asyncssh"
    assert sample(text, "fleetgate_wake_failures_total", backend="local", reason="backend_error") == 0.0
    assert sample(text, "fleetgate_wakes_total", backend="broken", result="failure", cause="login") == 1.0
    assert sample(text, "fleetgate_channels_total", kind="session", result="ok") is not None
    # docs/metrics.md against this live scrape: every family the gateway exposes is documented.
    from prometheus_client.parser import text_string_to_metric_families

    documented = set(re.findall(r"^\| `(fleetgate_\w+)` \|", METRICS_DOC.read_text(), re.M))
    scraped = {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(text)
               if f.name.startswith("fleetgate_")}
    assert scraped - documented == set(), f"exposed but not in docs/metrics.md: {scraped - documented}"
    check = await trio.run_process(["promtool", "check", "metrics"], stdin=exposition, capture_stdout=True,
                                   capture_stderr=True, check=False)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr

    # -- inhibition: FleetgateDown for an instance silences that instance's other alerts -----------
    await check_inhibition(am)
    print(f"e2e timings: first scrape {ready_at - t0:.1f} s, alert at webhook {alerted_at - ready_at:.1f} s "
          f"after the traffic started, total {trio.current_time() - t0:.1f} s")
    running.shutdown.set()


async def check_inhibition(am: str) -> None:
    def alert(name: str, severity: str, instance: str) -> dict[str, Any]:
        return {"labels": {"alertname": name, "severity": severity, "job": "fleetgate", "instance": instance},
                "annotations": {"summary": "posted by the e2e test"}}

    posted = [alert("FleetgateDown", "critical", "inhibit-a:9100"),
              alert("FleetgateReaperNotRunning", "warning", "inhibit-a:9100"),
              alert("FleetgateReaperNotRunning", "warning", "inhibit-b:9100")]
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{am}/api/v2/alerts", json=posted)
        assert r.status_code == 200, r.text
        with trio.fail_after(20):
            while True:  # Alertmanager ingests posted alerts asynchronously
                r = await client.get(f"{am}/api/v2/alerts", params={"filter": 'instance=~"inhibit-.*"'})
                state = {(a["labels"]["alertname"], a["labels"]["instance"]): a["status"] for a in r.json()}
                if len(state) == 3 and state[("FleetgateReaperNotRunning", "inhibit-a:9100")]["state"] == "suppressed":
                    break
                await trio.sleep(0.2)
    assert state[("FleetgateDown", "inhibit-a:9100")]["state"] == "active"
    assert state[("FleetgateReaperNotRunning", "inhibit-a:9100")]["inhibitedBy"]
    assert state[("FleetgateReaperNotRunning", "inhibit-b:9100")]["state"] == "active", "other instances unaffected"
