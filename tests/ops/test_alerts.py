"""deploy/prometheus/alerts.yml: valid, unit-tested on synthetic series with `promtool test rules`,
each alert firing and not firing, on metrics the server really exports, with a runbook section
in docs/OPERATIONS.md (issue 15, item 4)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.ops.conftest import Scrape
from tests.ops.promql import unknown_references
from tests.ops.tools import tool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
REQUIRED = {
    "OrchestratorDown",
    "OrchestratorFailoverPaused",
    "OrchestratorAgentsDown",
    "OrchestratorTaskQueueGrowing",
    "OrchestratorDispatchLatencyHigh",
    "OrchestratorStoreCommitErrors",
    "OrchestratorHeartbeatsRateLimited",
}


def alerts() -> list[dict[str, object]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_rules_are_valid_and_pass_their_unit_tests() -> None:
    promtool = tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_promtool_test_rules_fails_when_an_alert_breaks(tmp_path: Path) -> None:
    """The unit tests catch a broken rule: here the failover alert watching the wrong metric."""
    promtool = tool("promtool")
    (tmp_path / "alerts.yml").write_text(
        RULES.read_text().replace(
            "max by (instance) (orchestrator_failover_paused",
            "max by (instance) (orchestrator_failover_pausd",
        )
    )
    (tmp_path / "alerts_test.yml").write_text(RULE_TESTS.read_text())
    tested = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tested.returncode != 0 and "OrchestratorFailoverPaused" in tested.stdout + tested.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    names = {str(rule["alert"]) for rule in alerts()}
    assert names >= REQUIRED
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == names, f"never seen firing: {names - firing}"
    assert quiet == names, f"never seen quiet: {names - quiet}"


def test_every_alert_uses_exported_metrics_and_has_a_runbook(scrape: Scrape) -> None:
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    anchors = {
        re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", operations, re.M)
    }
    for rule in alerts():
        expr = str(rule["expr"])
        assert unknown_references(expr, scrape.labels) == [], rule["alert"]
        assert 'job="orchestrator"' in expr
        url = str(rule["annotations"]["runbook_url"])  # type: ignore[index]
        path, _, anchor = url.partition("#")
        assert path == "docs/OPERATIONS.md" and anchor in anchors, url
