"""Checks of deploy/prometheus and deploy/grafana without a swarm: promtool validates the Prometheus
configuration, the alert rules and their unit tests, and the Grafana dashboard is checked for
structure, its data source, valid PromQL and metric names that swarmnet really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .dashboard import dashboard_queries, panels

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "rules" / "swarmnet.yml"
RULE_TESTS = PROMETHEUS / "tests" / "swarmnet_test.yml"
DASHBOARD = GRAFANA / "dashboards" / "swarmnet.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"

METRIC_NAME = re.compile(r"\bswarmnet_\w+")

NOT_ALWAYS_THERE = (
    "swarmnet_trainer_microbatches_dropped_total",  # appears with the first dropped microbatch
    "swarmnet_trainer_retries_total",  # with the first retry
    "swarmnet_checkpoints_saved_total",  # only when checkpointing is enabled
    "swarmnet_archive_step",  # only with an archive
)
"""Series a live swarm may lack: no dashboard panel may chart them."""


# --- promtool ----------------------------------------------------------------------------------------


def promtool(*args: str | Path) -> None:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on PATH: install it (Debian: `apt-get install prometheus`) to check deploy/prometheus"
        )
    done = subprocess.run(
        [path, *map(str, args)], capture_output=True, text=True, timeout=50, cwd=ROOT, check=False
    )
    assert done.returncode == 0, (
        f"promtool {' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )


def test_prometheus_config_is_valid():
    promtool("check", "config", CONFIG)  # also checks the rule files it names


def test_alert_rules_are_valid():
    promtool("check", "rules", RULES)


def test_alert_rules_pass_their_unit_tests():
    promtool("test", "rules", RULE_TESTS)


def test_dashboard_queries_are_valid_promql(tmp_path):
    """Every dashboard query, variables substituted, parses (as a recording rule for promtool)."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_queries(DASHBOARD))
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", path)


# --- alert rules ---------------------------------------------------------------------------------------


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_a_severity_a_summary_a_description_and_a_firing_test():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]
    }
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), name
        assert {"summary", "description"} <= set(rule.get("annotations", {})), name
        assert name in fired, f"no test in {RULE_TESTS.name} shows {name} firing"


# --- dashboard -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_identity(dashboard):
    assert (dashboard["uid"], dashboard["title"]) == ("swarmnet", "swarmnet")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("stage", "instance"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*", name
        assert "swarmnet_peer_info" in variables[name]["definition"], name
    assert variables["stage"]["multi"]


def test_dashboard_panels_are_well_formed(dashboard):
    every = dashboard["panels"] + [p for row in dashboard["panels"] for p in row.get("panels", [])]
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == [
        "Swarm overview",
        "Per stage",
        "Per peer",
    ]
    taken: dict[tuple[int, int], str] = {}
    for panel in every:
        grid = panel.get("gridPos", {})
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24, (
            f"{panel['title']}: gridPos {grid}"
        )
        for cell in (
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        ):
            assert cell not in taken, f"{panel['title']} overlaps {taken[cell]}"
            taken[cell] = panel["title"]
    for panel in panels(dashboard):
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        exprs = [t.get("expr") for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"{panel['title']}: every panel needs targets, each with an expr"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']}: duplicate refIds"


def test_dashboard_uses_the_provisioned_datasource(dashboard):
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    (prometheus,) = [d for d in provisioned if d["type"] == "prometheus"]
    expected = {"type": "prometheus", "uid": prometheus["uid"]}
    for panel in panels(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", expected) == expected, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == expected, variable["name"]


def test_dashboard_rates_use_the_rate_interval(dashboard):
    for panel in panels(dashboard):
        for target in panel["targets"]:
            ranges = re.findall(r"\[([^\]]*)\]", target["expr"])
            assert all(r == "$__rate_interval" for r in ranges), f"{panel['title']}: {target['expr']}"


def test_dashboard_charts_only_series_a_live_swarm_has():
    for title, expr in dashboard_queries(DASHBOARD):
        for name in NOT_ALWAYS_THERE:
            assert name not in expr, f"{title}: {name} may not exist"
        assert not re.search(r"swarmnet_swarm_events_total\{[^}]*kind\s*=", expr), (
            f"{title}: events of one kind may not exist"
        )


# --- metric names ----------------------------------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_metric_names() -> set[str]:
    """Names of every series swarmnet can export: the families of `swarmnet.telemetry.metrics` in the
    default registry (with their per-type suffixes) and the coordinator's swarm view."""
    from prometheus_client import REGISTRY

    import swarmnet.telemetry.metrics  # noqa: F401 - registers every family
    from swarmnet.coordinator.view import SWARM_METRIC_NAMES

    names = set(SWARM_METRIC_NAMES)
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def used_metric_names() -> dict[str, set[str]]:
    """swarmnet_* names used by the dashboard, the alert rules and the rules' unit-test input, by where."""
    used: dict[str, set[str]] = {}

    def add(where: str, text: str) -> None:
        for name in METRIC_NAME.findall(text):
            used.setdefault(name, set()).add(where)

    for title, expr in dashboard_queries(DASHBOARD):
        add(f"dashboard panel {title!r}", expr)
    for rule in alert_rules():
        add(f"alert {rule['alert']}", rule["expr"])
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for series in test.get("input_series", []):
            add(f"rule test {test.get('name')!r}", series["series"].split("{")[0])
    return used


def test_every_metric_name_is_exported():
    exported = exported_metric_names()
    used = used_metric_names()
    assert len(used) > 30  # the scan found the dashboard's, rules' and tests' names
    unknown = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not unknown, f"metric names swarmnet does not export: {unknown}"
