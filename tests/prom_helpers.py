"""Helpers shared by the alert, dashboard and Prometheus end-to-end tests.

The rules and the dashboard are checked against the metric names and types of a real
`fleetgate.metrics.Metrics` registry, so that renaming a metric in the gateway breaks these
tests instead of silently emptying a panel or muting an alert. PromQL is read with
promql-parser (a real PromQL grammar), never with regular expressions.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import promql_parser
import yaml

from fleetgate.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "alerts"
RULES = ALERTS / "fleetgate.rules.yml"
RULE_TESTS = (ALERTS / "fleetgate.rules.test.yml", ALERTS / "fleetgate.slo.test.yml",
              ALERTS / "fleetgate.quiet.test.yml")
ALERTMANAGER = ALERTS / "alertmanager.yml"
DASHBOARD = REPO / "dashboards" / "fleetgate.json"
RUNBOOKS = REPO / "docs" / "runbooks.md"
METRICS_DOC = REPO / "docs" / "metrics.md"
RUNBOOK_BASE = "https://github.com/fleetgate/fleetgate/blob/main/docs/runbooks.md"

RANGE_FUNCTIONS = frozenset({"rate", "increase", "irate"})
# Series Prometheus itself adds for every target.
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alerting_rules(doc: dict | None = None) -> Iterator[tuple[int, int, dict]]:
    """(group index, rule index, rule) for every alerting rule, so a test can mutate one in place."""
    doc = doc if doc is not None else load_yaml(RULES)
    for gi, group in enumerate(doc["groups"]):
        for ri, rule in enumerate(group["rules"]):
            if "alert" in rule:
                yield gi, ri, rule


def recorded_names(doc: dict | None = None) -> set[str]:
    doc = doc if doc is not None else load_yaml(RULES)
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def exposed_series() -> dict[str, str]:
    """Every sample name the gateway can expose, mapped to its family's type.

    Derived from the families of a real registry rather than from one exposition, because a
    labelled metric exposes no sample until its first labels are used (keep-awake leases, say).
    """
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum"),
                "info": ("_info",)}
    out = {}
    for family in Metrics().registry.collect():
        for suffix in suffixes[family.type]:
            out[family.name + suffix] = family.type
    return out


@dataclass(frozen=True)
class Selector:
    name: str | None
    function: str | None  # the range function directly around it (rate, increase, irate), if any
    range: timedelta | None
    matchers: dict[str, str]  # label -> value, for the selector's label matchers

    @property
    def rated(self) -> bool:
        return self.function in RANGE_FUNCTIONS


def selectors(expr: str) -> list[Selector]:
    """Every vector selector in a PromQL expression, with the range function around it."""
    tree = promql_parser.parse(expr)
    stack: list[Any] = []
    found: list[Selector] = []

    def pre(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            function = rng = None
            if len(stack) >= 2 and isinstance(stack[-1], promql_parser.MatrixSelector) \
                    and isinstance(stack[-2], promql_parser.Call):
                function, rng = stack[-2].func.name, stack[-1].range
            matchers = {m.name: m.value for m in node.matchers.matchers}
            found.append(Selector(node.name, function, rng, matchers))
        stack.append(node)

    def post(node: Any) -> None:
        stack.pop()

    promql_parser.walk(tree, pre, post)
    return found


def lint_expr(expr: str, known: dict[str, str], extra_names: set[str] = frozenset()) -> list[str]:
    """Problems in one expression: unknown metric names, counters read without rate()/increase()."""
    problems = []
    for sel in selectors(expr):
        if sel.name is None:
            problems.append("selector without a metric name")
        elif sel.name not in known and sel.name not in extra_names and sel.name not in SCRAPE_SERIES:
            problems.append(f"unknown metric {sel.name}")
        elif known.get(sel.name) in ("counter", "histogram") and not sel.rated:
            problems.append(f"{sel.name} is a {known[sel.name]} read without rate() or increase()")
    return problems


def run_tool(argv: Sequence[str], timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run promtool/amtool synchronously; these tests have no event loop to keep alive."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (lower case, punctuation dropped, spaces to dashes)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> dict[str, str]:
    """Anchor → heading for every heading of docs/runbooks.md."""
    out = {}
    for line in RUNBOOKS.read_text().splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            out[github_anchor(m.group(1))] = m.group(1).strip()
    return out


# -- Grafana dashboard -----------------------------------------------------------------------

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>[a-zA-Z_]\w*)\s*\)\s*$")


def load_dashboard() -> dict:
    import json

    return json.loads(DASHBOARD.read_text())


def data_panels(dash: dict) -> list[dict]:
    """Panels that show data (rows are only headings), including those inside collapsed rows."""
    out = []
    for panel in dash["panels"]:
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def panel_queries(dash: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) for every query of every panel."""
    return [(p["title"], t.get("refId", "?"), t["expr"]) for p in data_panels(dash) for t in p.get("targets", [])]


def query_variables(dash: dict) -> list[dict]:
    return [v for v in dash["templating"]["list"] if v["type"] == "query"]


def variable_query(var: dict) -> str:
    q = var["query"]
    return q["query"] if isinstance(q, dict) else q


def grafana_regex_value(value: str) -> str:
    """A variable value as Grafana puts it in a Prometheus regex matcher: regex-escaped, in a PromQL string."""
    return re.escape(value).replace("\\", "\\\\")


def interpolate(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana's $name and ${name} with the given values (longest names first)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr
