"""Fault injection inside a process, switched on by environment variables (tests only).

`SWARMNET_FAULT_ROUND_DELAY=<seconds>`: a peer pauses this long at the start of every all-reduce
round, after freezing its gradients — the window in which the chaos tests kill it mid-round.
"""

from __future__ import annotations

import os

ROUND_DELAY = "SWARMNET_FAULT_ROUND_DELAY"


def round_delay() -> float:
    try:
        return max(float(os.environ.get(ROUND_DELAY, "0")), 0.0)
    except ValueError:
        return 0.0
