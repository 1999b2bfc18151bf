"""`fleetgate demo --monitoring`: the demo with what it is used with, on loopback.

Next to the demo gateway it starts:

- Prometheus (Debian's `prometheus`), scraping the demo's /metrics and itself, with the
  project's rules (alerts/fleetgate.rules.yml, unchanged) loaded;
- Alertmanager (`prometheus-alertmanager` or `alertmanager`), with the example configuration
  (alerts/alertmanager.yml) whose webhook receivers point at
- a webhook receiver here, which prints every notification on stdout, one line per alert.

Intervals are shortened (2 s scrapes and evaluations, 2 s group_wait) so that a failed wake
shows as a notification within seconds; the rules themselves are the shipped ones. The demo's
`broken` machine (its sshd is /bin/false) is the documented way to make a wake fail:
`ssh ... alice+broken@127.0.0.1` → FleetgateWakeFailures reaches the default receiver.

The alert rules and the Alertmanager example are read from the source tree (they are not
part of the Python package): run the demo from a checkout, or pass --monitoring-dir.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import h11
import trio

INTERVAL = "2s"


def find_assets(explicit: Path | None = None) -> Path:
    """The directory holding fleetgate.rules.yml and alertmanager.yml."""
    for d in ([explicit] if explicit else []) + [Path(__file__).resolve().parent.parent / "alerts"]:
        if d and (d / "fleetgate.rules.yml").is_file() and (d / "alertmanager.yml").is_file():
            return d
    raise FileNotFoundError("alerts/fleetgate.rules.yml not found: run the demo from a fleetgate checkout "
                            "or pass --monitoring-dir DIR (a copy of the repository's alerts/ directory)")


def find_binaries() -> tuple[str, str]:
    prom = shutil.which("prometheus")
    am = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if not prom or not am:
        missing = [n for n, p in (("prometheus", prom), ("prometheus-alertmanager", am)) if not p]
        raise FileNotFoundError(f"not installed: {', '.join(missing)} (Debian: apt-get install prometheus "
                                "prometheus-alertmanager)")
    return prom, am


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notification_lines(receiver: str, payload: dict) -> list[str]:
    """What the webhook receiver prints for one Alertmanager notification: a line per alert."""
    out = []
    for alert in payload.get("alerts", []):
        labels = dict(alert.get("labels", {}))
        name = labels.pop("alertname", "?")
        severity = labels.pop("severity", "?")
        for k in ("job", "instance"):
            labels.pop(k, None)
        extra = " ".join(f"{k}={v}" for k, v in sorted(labels.items()))
        desc = alert.get("annotations", {}).get("description", "")
        out.append(f"alertmanager -> {receiver}: {alert.get('status', '?').upper()} {name} ({severity}) "
                   f"{extra}: {desc}".rstrip())
    return out


class WebhookReceiver:
    """Alertmanager's webhook receiver: prints each notification (h11 over a trio listener)."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        target, body = "", b""
        try:
            with trio.fail_after(30):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Request):
                        target, body = event.target.decode(), b""
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        try:
                            for line in notification_lines(target.strip("/") or "?", json.loads(body)):
                                self.emit(line)
                        except ValueError:
                            self.emit(f"alertmanager -> {target}: (not JSON)")
                        await stream.send_all(conn.send(h11.Response(status_code=200,
                                                                     headers=[("content-length", "0")])))
                        await stream.send_all(conn.send(h11.EndOfMessage()))
                        if conn.our_state is h11.MUST_CLOSE:
                            return
                        conn.start_next_cycle()
                    else:
                        return
        except (trio.BrokenResourceError, trio.TooSlowError, h11.RemoteProtocolError):
            return


def write_configs(work: Path, assets: Path, metrics_port: int, prom_port: int, am_port: int,
                  hook_port: int) -> tuple[Path, Path]:
    try:
        import yaml  # only here: the gateway itself does not need it
    except ImportError:
        raise FileNotFoundError("the monitoring demo reads alerts/alertmanager.yml with PyYAML: "
                                "pip install pyyaml") from None
    work.mkdir(parents=True, exist_ok=True)
    am = yaml.safe_load((assets / "alertmanager.yml").read_text())
    for receiver in am["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"http://127.0.0.1:{hook_port}/{receiver['name']}"
    am["route"]["group_wait"] = INTERVAL
    am["route"]["group_interval"] = "10s"
    am_cfg = work / "alertmanager.yml"
    am_cfg.write_text("# Written by `fleetgate demo --monitoring` from alerts/alertmanager.yml (webhooks and "
                      "timings changed)\n" + yaml.safe_dump(am, sort_keys=False))
    prom = {
        "global": {"scrape_interval": INTERVAL, "scrape_timeout": INTERVAL, "evaluation_interval": INTERVAL},
        "rule_files": [str(assets / "fleetgate.rules.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
        "scrape_configs": [
            {"job_name": "fleetgate", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{prom_port}"]}]},
        ],
    }
    prom_cfg = work / "prometheus.yml"
    prom_cfg.write_text(json.dumps(prom, indent=2))  # JSON is YAML
    return prom_cfg, am_cfg


async def run(work: Path, metrics_port: int, *, assets: Path | None = None,
              emit: Callable[[str], None] = lambda line: print(line, flush=True),
              task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Start the receiver, Alertmanager and Prometheus; started() with their URLs; run until cancelled."""
    assets = find_assets(assets)
    prom_bin, am_bin = find_binaries()
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, WebhookReceiver(emit).handle, 0, host="127.0.0.1"))
        hook_port = listener.socket.getsockname()[1]
        prom_port, am_port = free_port(), free_port()
        prom_cfg, am_cfg = write_configs(work, assets, metrics_port, prom_port, am_port, hook_port)
        logs = {}
        for name, argv in (
            ("alertmanager", [am_bin, f"--config.file={am_cfg}", f"--storage.path={work / 'am-data'}",
                              f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=",
                              "--log.level=warn"]),
            ("prometheus", [prom_bin, f"--config.file={prom_cfg}", f"--storage.tsdb.path={work / 'prom-data'}",
                            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]),
        ):
            logs[name] = log = open(work / f"{name}.log", "ab")
            nursery.start_soon(_supervise, name, argv, log, emit)
        urls = {"prometheus": f"http://127.0.0.1:{prom_port}", "alertmanager": f"http://127.0.0.1:{am_port}",
                "webhook": f"http://127.0.0.1:{hook_port}"}
        task_status.started(urls)
        try:
            await trio.sleep_forever()
        finally:
            for f in logs.values():
                f.close()


async def _supervise(name: str, argv: list[str], log, emit: Callable[[str], None]) -> None:
    """Run one monitoring process; say so if it exits (the demo gateway goes on without it)."""
    p = await trio.run_process(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=False)
    emit(f"fleetgate demo: {name} exited with status {p.returncode}; see {log.name}")


def instructions(urls: dict[str, str], ssh_base: str, work: Path) -> str:
    return "\n".join([
        "monitoring (fleetgate demo --monitoring):",
        f"  Prometheus    {urls['prometheus']}   (alerts: {urls['prometheus']}/alerts; "
        "rules: alerts/fleetgate.rules.yml)",
        f"  Alertmanager  {urls['alertmanager']}",
        f"  notifications are printed here by the webhook receiver at {urls['webhook']}",
        "  Grafana: import dashboards/fleetgate.json (Dashboards > New > Import) with this Prometheus as data source",
        "break a machine on purpose (its sshd is /bin/false, so the wake fails):",
        f"  {ssh_base} alice+broken@127.0.0.1 true",
        "  -> within ~10 s: 'alertmanager -> default: FIRING FleetgateWakeFailures (warning) backend=broken ...'",
        f"  configs and logs: {work}",
    ])


if __name__ == "__main__":  # pragma: no cover - a manual check of the receiver's output
    print("\n".join(notification_lines("default", json.load(sys.stdin))))
