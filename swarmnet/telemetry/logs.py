"""Logging set-up for the command-line roles (library code never configures the root logger)."""

from __future__ import annotations

import logging
import os


def setup_logging(role: str, level: str | None = None) -> None:
    level = (level or os.environ.get("SWARMNET_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # hivemind logs through its own handler; keep it quieter than ours unless debugging.
    hivemind_level = "DEBUG" if level == "DEBUG" else "WARNING"
    os.environ.setdefault("HIVEMIND_LOGLEVEL", hivemind_level)
    logging.getLogger("hivemind").setLevel(hivemind_level)
