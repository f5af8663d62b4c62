"""Reads the PromQL queries out of a Grafana dashboard, ready to send to a real Prometheus.

`dashboard_queries` substitutes the dashboard's template variables with values that select
everything (`$stage`, `$instance` -> `.*`) and Grafana's interval variables with fixed durations,
so a live test can check that every panel's every target returns data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SUBSTITUTIONS = {
    "stage": ".*",
    "instance": ".*",
    "__rate_interval": "30s",
    "__interval": "15s",
    "__range": "5m",
}
"""Value of each variable a dashboard query may use; any other variable is an error."""

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str, values: dict[str, str] = SUBSTITUTIONS) -> str:
    """`expr` with `$name`, `${name}` and `${name:format}` replaced by `values[name]`."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels (collapsed rows) included, rows themselves excluded."""
    found = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def dashboard_queries(path: str | Path) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, variables substituted."""
    dashboard = json.loads(Path(path).read_text())
    return [
        (panel["title"], substitute(target["expr"]))
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
