"""Lint dashboards/fleetgate.json: importable and provisionable as it is, and every query sound.

"Sound" means: it parses as PromQL once Grafana's variables are filled in, it names only metrics
the gateway really exposes, counters and histograms are read through rate()/increase(), every
rate uses $__rate_interval, and every selector honours the job and instance variables. Whether
the queries return data from a real gateway is tests/test_prometheus_e2e.py's job.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from prom_helpers import (DATASOURCE_REF, LABEL_VALUES, data_panels, exposed_series, interpolate, lint_expr,
                          load_dashboard, panel_queries, query_variables, selectors, variable_query)

# Sentinel values: distinct durations so a selector's range tells which variable it came from.
RATE_INTERVAL = timedelta(seconds=4321)
RANGE = timedelta(seconds=8642)
LINT_VALUES = {"__rate_interval": "4321s", "__range": "8642s", "__interval": "1111s",
               "job": "__job__", "instance": "__instance__"}

DASH = load_dashboard()
QUERIES = panel_queries(DASH)


def test_dashboard_is_importable_and_provisionable() -> None:
    # A fixed uid keeps links stable across imports; id null lets Grafana assign its own;
    # no __inputs/hard-coded datasource uid, so file provisioning needs no manual mapping.
    assert DASH["uid"] == "fleetgate"
    assert DASH["id"] is None
    assert DASH["title"] and DASH["schemaVersion"] >= 36
    assert "__inputs" not in DASH
    ids = [p["id"] for p in DASH["panels"]] + [p["id"] for p in data_panels(DASH) if p not in DASH["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in DASH["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["w"] > 0 and pos["h"] > 0, p["title"]


def test_variables_datasource_job_instance() -> None:
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == DATASOURCE_REF
        m = LABEL_VALUES.match(variable_query(var))
        assert m and m.group("label") == name, variable_query(var)
        assert var["includeAll"] and var["multi"]
    assert '$job' in variable_query(variables["instance"]), "instance must be filtered by the chosen job"


@pytest.mark.parametrize("panel", data_panels(DASH), ids=lambda p: p["title"])
def test_panel_has_datasource_unit_description(panel: dict) -> None:
    assert panel["datasource"] == DATASOURCE_REF
    assert panel.get("description", "").strip(), "every panel says what it shows"
    assert panel["fieldConfig"]["defaults"].get("unit"), "every panel has a unit"
    if panel["type"] == "heatmap":
        assert panel["options"]["yAxis"].get("unit"), "a heatmap's unit is on its y axis"
    assert panel["targets"], "a panel without a query shows nothing"
    for t in panel["targets"]:
        assert t.get("datasource", DATASOURCE_REF) == DATASOURCE_REF


def test_dashboard_covers_what_operators_need() -> None:
    used = {s.name for _, _, expr in QUERIES for s in selectors(interpolate(expr, LINT_VALUES))}
    for name in ("fleetgate_active_sessions", "fleetgate_wakes_total", "fleetgate_wake_failures_total",
                 "fleetgate_boot_latency_seconds_bucket", "fleetgate_machine_state", "fleetgate_machine_last_activity_timestamp_seconds",
                 "fleetgate_reaper_stops_total", "fleetgate_auth_failures_total", "fleetgate_relayed_bytes_total",
                 "fleetgate_backend_call_duration_seconds_bucket", "fleetgate_connections_total"):
        assert name in used, f"no panel shows {name}"
    types = {p["type"] for p in data_panels(DASH)}
    assert "heatmap" in types
    boot = [expr for _, _, expr in QUERIES if "fleetgate_boot_latency_seconds_bucket" in expr]
    assert any("histogram_quantile(0.5," in e for e in boot) and any("histogram_quantile(0.95," in e for e in boot)


@pytest.mark.parametrize("title,ref,expr", QUERIES, ids=[f"{t}/{r}" for t, r, _ in QUERIES])
def test_query_is_sound(title: str, ref: str, expr: str) -> None:
    known = exposed_series()
    concrete = interpolate(expr, LINT_VALUES)
    assert "$" not in concrete, f"unknown Grafana variable in {expr}"
    problems = lint_expr(concrete, known)  # no recording rules: the dashboard works without our rules
    assert not problems, problems
    for sel in selectors(concrete):
        assert sel.matchers.get("job") == "__job__" and sel.matchers.get("instance") == "__instance__", \
            f"{sel.name} ignores the job/instance variables"
        if sel.function in ("rate", "irate"):
            assert sel.range == RATE_INTERVAL, f"{sel.function}({sel.name}) must use $__rate_interval"
        elif sel.function == "increase":
            assert sel.range in (RATE_INTERVAL, RANGE), f"increase({sel.name}) over $__rate_interval or $__range"


def test_lint_catches_what_it_should() -> None:
    """The checks above must be able to fail: feed them the mistakes they look for."""
    known = exposed_series()
    assert lint_expr("fleetgate_wakes_total", known) == [
        "fleetgate_wakes_total is a counter read without rate() or increase()"]
    assert lint_expr("sum(fleetgate_boot_latency_seconds_bucket)", known)
    assert lint_expr("rate(fleetgate_wake_total[5m])", known) == ["unknown metric fleetgate_wake_total"]
    assert lint_expr("rate(fleetgate_wakes_total[5m]) / on() group_left fleetgate_machine_state", known) == []


def test_gateways_up_counts_only_fleetgate_targets_and_shows_down_ones() -> None:
    """Issue 14, defect 1: "All" must not become `.+` (every job's targets, Prometheus itself included),
    and the instance list comes from `up`, so a gateway that is down is still listed and counted."""
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    assert "allValue" not in variables["job"], "All = the fleetgate jobs listed, not every job"
    assert "allValue" not in variables["instance"]
    m = LABEL_VALUES.match(variable_query(variables["instance"]))
    assert m and m.group("match").startswith("up{"), "a down gateway has no fresh fleetgate_* series; up has"
    [panel] = [p for p in data_panels(DASH) if p["title"] == "Gateways up / down"]
    legends = {t["legendFormat"]: t["expr"] for t in panel["targets"]}
    assert set(legends) == {"up", "down"}


def test_cooldown_is_left_out_everywhere_failures_are_counted() -> None:
    exprs = [expr for _, _, expr in QUERIES if "fleetgate_wake_failures_total" in expr]
    assert exprs and all('reason!="cooldown"' in e for e in exprs), exprs


def test_operator_panels_of_issue_14() -> None:
    used = {s.name for _, _, expr in QUERIES for s in selectors(interpolate(expr, LINT_VALUES))}
    for name in ("fleetgate_config_last_reload_successful", "fleetgate_config_last_reload_success_timestamp_seconds",
                 "fleetgate_keep_awake_leases", "fleetgate_machine_lost_total", "fleetgate_passthrough_refusals_total",
                 "fleetgate_machine_running_seconds_total", "fleetgate_time_to_shell_seconds_bucket",
                 "fleetgate_unauthenticated_connections", "fleetgate_backend_requests_total"):
        assert name in used, f"no panel shows {name}"
    assert any("by (cause)" in e for _, _, e in QUERIES), "no panel shows why machines woke"
