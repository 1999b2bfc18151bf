"""The alert rules, their promtool unit tests, the runbooks and the Alertmanager example.

promtool and amtool come from Debian's prometheus and prometheus-alertmanager packages
(scripts/setup.sh installs them). Besides running the unit tests, this module mutates every
threshold and every `for:` of every alert tenfold in both directions and checks that the unit
tests notice: a test suite that still passes with a wrong threshold tests nothing.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from prom_helpers import (ALERTMANAGER, METRICS_DOC, RULE_TESTS, RULES, RUNBOOK_BASE, RUNBOOKS, alerting_rules,
                          exposed_series, lint_expr, load_yaml, recorded_names, run_tool, runbook_anchors)

from fleetgate.metrics import Metrics

RULES_DOC = load_yaml(RULES)
ALERT_NAMES = sorted({r["alert"] for _, _, r in alerting_rules(RULES_DOC)})
SEVERITIES = {"critical", "warning", "info"}
# A comparison with a number: the thresholds of our rules (label matchers compare with strings).
THRESHOLD = re.compile(r"(>=|<=|>|<)\s*\(?\s*(\d+(?:\.\d+)?)")
DURATION = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def rule_test_docs() -> list[tuple[Path, dict]]:
    return [(p, load_yaml(p)) for p in RULE_TESTS]


def test_promtool_check_rules_is_clean() -> None:
    r = run_tool(["promtool", "check", "rules", str(RULES)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "WARNING" not in (r.stdout + r.stderr).upper()


@pytest.mark.e2e  # ~10 s of promtool runs: the end-to-end tier, with the alert mutation test
def test_promtool_unit_tests_pass() -> None:
    r = run_tool(["promtool", "test", "rules", *map(str, RULE_TESTS)], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(RULE_TESTS), r.stdout


@pytest.mark.parametrize("alert", ALERT_NAMES)
def test_every_alert_fires_and_stays_quiet_in_unit_tests(alert: str) -> None:
    fires, quiet = [], []
    for _, doc in rule_test_docs():
        for group in doc["tests"]:
            for case in group.get("alert_rule_test", []):
                if case["alertname"] == alert:
                    (fires if case.get("exp_alerts") else quiet).append(case)
    assert fires, f"no unit test where {alert} fires"
    assert quiet, f"no unit test where {alert} must not fire"
    for case in fires:
        for exp in case["exp_alerts"]:
            assert exp["exp_labels"].get("severity") in SEVERITIES
            assert set(exp["exp_annotations"]) == {"summary", "description", "runbook_url"}, \
                "firing cases check every annotation exactly"


@pytest.mark.parametrize("gi,ri,rule", list(alerting_rules(RULES_DOC)),
                         ids=[f"{r['alert']}[{ri}]" for _, ri, r in alerting_rules(RULES_DOC)])
def test_alert_style(gi: int, ri: int, rule: dict) -> None:
    name = rule["alert"]
    assert re.fullmatch(r"Fleetgate[A-Z][A-Za-z0-9]+", name)
    assert rule["labels"]["severity"] in SEVERITIES
    ann = rule["annotations"]
    assert ann["summary"].strip().endswith(".")
    assert "{{" in ann["description"], "the description carries the values that matter"
    assert ann["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}"
    assert name.lower() in runbook_anchors(), f"docs/runbooks.md has no section {name}"
    problems = lint_expr(rule["expr"], exposed_series(), recorded_names(RULES_DOC))
    assert not problems, problems


def test_recording_rules_use_exposed_metrics() -> None:
    for group in RULES_DOC["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                assert re.fullmatch(r"fleetgate:[a-z_]+:[a-z0-9_]+", rule["record"])  # level:metric:operations
                assert not lint_expr(rule["expr"], exposed_series()), rule["record"]


def test_runbooks_have_a_section_per_alert_and_no_stale_ones() -> None:
    text = RUNBOOKS.read_text()
    sections = re.findall(r"^## (Fleetgate\w+)$", text, re.M)
    assert sorted(sections) == ALERT_NAMES
    for body in re.split(r"^## Fleetgate\w+$", text, flags=re.M)[1:]:
        for part in ("**Meaning.**", "**Check.**", "**Do.**"):
            assert part in body


def test_metrics_doc_lists_every_metric_with_type_and_labels() -> None:
    doc = METRICS_DOC.read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(fleetgate_\w+)` \|.*$", doc, re.M)}
    # prometheus-client keeps a metric's name, type and label names in attributes without a public
    # accessor (collect() only shows labels that have been used); they have been stable for years.
    metrics = Metrics()
    families = [v for v in vars(metrics).values() if hasattr(v, "_labelnames") and hasattr(v, "_type")]
    assert families
    for family in families:
        name = {"counter": family._name + "_total", "info": family._name + "_info"}.get(family._type, family._name)
        assert name in rows, f"docs/metrics.md does not list {name}"
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        assert cells[1].startswith(family._type), f"{name}: type {family._type}, doc says {cells[1]}"
        for label in family._labelnames:
            assert f"`{label}`" in cells[2], f"{name}: label {label} missing from docs/metrics.md"
        assert len(cells[3]) > 20, f"{name}: say what it means"
    documented = set(rows)
    exposed = {n for n in exposed_series() if not n.endswith(("_bucket", "_count", "_sum"))}
    exposed |= {n[: -len("_bucket")] for n in exposed_series() if n.endswith("_bucket")}
    assert documented <= exposed, f"docs/metrics.md lists metrics that do not exist: {documented - exposed}"


# -- a wrong threshold must fail the unit tests ------------------------------------------------

def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)


def _mutants() -> list[tuple[str, int, int, str, str]]:
    """(id, group, rule, key, new value): every threshold and `for:` of every alert, ×10 and ÷10."""
    out = []
    for gi, ri, rule in alerting_rules(RULES_DOC):
        for k, m in enumerate(THRESHOLD.finditer(rule["expr"])):
            value = float(m.group(2))
            for new in ((value * 10, value / 10) if value else (100.0,)):
                expr = rule["expr"][:m.start(2)] + _fmt(new) + rule["expr"][m.end(2):]
                out.append((f"{rule['alert']}[{ri}] threshold {k} {m.group(1)} {m.group(2)} -> {_fmt(new)}",
                            gi, ri, "expr", expr))
        if "for" in rule:
            d = DURATION.match(rule["for"])
            assert d, rule["for"]
            seconds = int(d.group(1)) * UNITS[d.group(2)]
            for new_s in (seconds * 10, seconds // 10):
                out.append((f"{rule['alert']}[{ri}] for {rule['for']} -> {new_s}s", gi, ri, "for", f"{new_s}s"))
    return out


MUTANTS = _mutants()


def _run_mutant(tmp: Path, gi: int, ri: int, key: str, value: str) -> tuple[int, str]:
    """Write the mutated rules next to copies of the unit tests that exercise that alert, and run them."""
    alert = RULES_DOC["groups"][gi]["rules"][ri]["alert"]
    doc = load_yaml(RULES)
    doc["groups"][gi]["rules"][ri][key] = value
    tmp.mkdir(parents=True)
    (tmp / RULES.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    files = []
    for path, tests in rule_test_docs():
        groups = [g for g in tests["tests"] if any(c["alertname"] == alert for c in g.get("alert_rule_test", []))]
        if groups:
            (tmp / path.name).write_text(yaml.safe_dump(dict(tests, tests=groups), sort_keys=False))
            files.append(str(tmp / path.name))
    r = run_tool(["promtool", "test", "rules", *files], timeout=120)
    return r.returncode, r.stdout


def test_mutants_cover_every_alert() -> None:
    mutated = {m[0].split("[")[0] for m in MUTANTS}
    # FleetgateAbsent and FleetgateDown have no numeric threshold (absent(), == 0) but have a `for:`.
    assert mutated == set(ALERT_NAMES)


@pytest.mark.e2e  # runs the real promtool once per mutated threshold and for: (~90 s): end-to-end tier
def test_wrong_thresholds_fail_the_unit_tests(tmp_path: Path) -> None:
    # The unmutated copy must pass, or every "killed" mutant below would prove nothing.
    first = MUTANTS[0]
    rc, out = _run_mutant(tmp_path / "original", first[1], first[2], first[3],
                          RULES_DOC["groups"][first[1]]["rules"][first[2]][first[3]])
    assert rc == 0, out
    with ThreadPoolExecutor(max_workers=2) as pool:  # promtool is single-threaded; CI has 2 cores
        results = list(pool.map(lambda im: _run_mutant(tmp_path / str(im[0]), *im[1][1:]), enumerate(MUTANTS)))
    survivors = [m[0] for m, (rc, _) in zip(MUTANTS, results) if rc == 0]
    assert not survivors, f"the unit tests still pass with these wrong rules: {survivors}"


# -- Alertmanager ---------------------------------------------------------------------------

def test_amtool_check_config() -> None:
    r = run_tool(["amtool", "check-config", str(ALERTMANAGER)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def _route(*labels: str, expect: str | None = None) -> tuple[int, str]:
    argv = ["amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER}"]
    if expect:
        argv.append(f"--verify.receivers={expect}")
    r = run_tool([*argv, *labels])
    return r.returncode, r.stdout.strip()


@pytest.mark.parametrize("alert", ALERT_NAMES)
def test_amtool_routes_every_alert_by_severity(alert: str) -> None:
    for _, _, rule in alerting_rules(RULES_DOC):
        if rule["alert"] != alert:
            continue
        severity = rule["labels"]["severity"]
        expect = "pager" if severity == "critical" else "default"
        rc, out = _route(f"alertname={alert}", f"severity={severity}", "instance=gw1:9100", "job=fleetgate",
                         expect=expect)
        assert rc == 0 and out == expect, out


def test_amtool_route_verification_can_fail() -> None:
    rc, out = _route("alertname=FleetgateWakeFailures", "severity=warning", expect="pager")
    assert rc != 0 and out.startswith("default")


def test_alertmanager_grouping_and_inhibition() -> None:
    cfg = load_yaml(ALERTMANAGER)
    # backend: two failing backends are two notifications, the second not held a group_interval (issue 14).
    assert cfg["route"]["group_by"] == ["alertname", "instance", "backend"]
    [rule] = cfg["inhibit_rules"]
    assert rule["source_matchers"] == ['alertname="FleetgateDown"']
    assert set(rule["equal"]) == {"job", "instance"}
    # The inhibition itself is exercised against a real Alertmanager in test_prometheus_e2e.py.
