"""deploy/grafana/orchestrator.json: every panel expression parsed by promtool and naming only
metrics, labels and values a real server exports (issue 15, item 5)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.ops.conftest import Scrape
from tests.ops.promql import metric_names, selectors, unknown_references
from tests.ops.tools import tool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "orchestrator.json"
# Grafana's variables, as it would expand them (an "All" instance is `.*`).
VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
# The list: agents by status, sessions, beat rate, RPC latency by method, queue depth,
# dispatch latency, failovers.
REQUIRED_METRICS = {
    "orchestrator_agents",
    "orchestrator_sessions",
    "orchestrator_heartbeats_total",
    "orchestrator_rpc_duration_seconds_bucket",
    "orchestrator_tasks_pending",
    "orchestrator_dispatch_latency_seconds_bucket",
    "orchestrator_failovers_total",
}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def expressions() -> list[tuple[str, str]]:
    """(panel title / refId, expression with the variables expanded)."""
    found = []
    for panel in dashboard()["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown variable in {target['expr']}"
            found.append((f"{panel['title']} / {target['refId']}", expr))
    return found


def test_every_expression_parses(tmp_path: Path) -> None:
    """promtool has no offline query parser, but `check rules` parses every rule's expression."""
    promtool = tool("promtool")
    rules = [
        {"record": f"dashboard:expr_{index}", "expr": expr} for index, (_, expr) in enumerate(expressions())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # And a broken expression is reported (the check is not a no-op).
    rules[0]["expr"] = "sum by (status (orchestrator_agents)"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    broken = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert broken.returncode != 0


def test_every_expression_names_what_the_server_exports(scrape: Scrape) -> None:
    used: set[str] = set()
    for where, expr in expressions():
        assert unknown_references(expr, scrape.labels) == [], where
        for _name, matchers in selectors(expr):
            assert {(m.label, m.value) for m in matchers} >= {("job", "orchestrator"), ("instance", ".*")}, (
                where
            )
        used |= metric_names(expr)
    assert used >= REQUIRED_METRICS, REQUIRED_METRICS - used


def test_the_server_exposition_passes_promtool_lint(scrape: Scrape) -> None:
    promtool = tool("promtool")
    linted = subprocess.run(
        [promtool, "check", "metrics"], input=scrape.text, capture_output=True, text=True, timeout=60
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "_created" not in scrape.text


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "orchestrator"
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    # No two panels overlap on Grafana's 24-column grid.
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & area, panel["title"]
        cells |= area
