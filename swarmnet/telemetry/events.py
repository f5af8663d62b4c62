"""Machine-readable lifecycle events on stdout: one `@swarmnet {json}` line each.

Humans read the logs on stderr; the test kit, the demo and scripts read these lines (a peer is
ready, a trainer finished a step) instead of guessing with sleeps. They are written only when the
environment sets `SWARMNET_EVENTS=1` (the test kit does), so interactive output stays readable.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

PREFIX = "@swarmnet "


ENV = "SWARMNET_EVENTS"


def emit(event: str, **fields: Any) -> None:
    if os.environ.get(ENV) != "1":
        return
    sys.stdout.write(PREFIX + json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


def parse(line: str) -> dict[str, Any] | None:
    """The event of one output line, or None for any other line."""
    if not line.startswith(PREFIX):
        return None
    try:
        event = json.loads(line[len(PREFIX) :])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None
