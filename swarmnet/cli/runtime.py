"""Running one role on one event loop: uvloop if present, signals, typed errors to exit codes."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from swarmnet.errors import SwarmnetError
from swarmnet.telemetry.logs import setup_logging

logger = logging.getLogger("swarmnet.cli")

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130


def run_role(role: str, log_level: str | None, main: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> int:
    """Runs `main(stop)` until it returns; SIGINT/SIGTERM set `stop`, a second one cancels."""
    setup_logging(role, log_level)

    async def supervised() -> Any:
        stop = asyncio.Event()
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                task.cancel()
            else:
                logger.info("stopping (signal again to abort)")
                stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
        return await main(stop)

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(supervised())
        return EXIT_OK
    except SwarmnetError as e:
        print(f"swarmnet {role}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, asyncio.CancelledError):
        return EXIT_INTERRUPTED


def _dump_tasks() -> None:
    """SIGUSR1: writes every asyncio task's stack to stderr (what is this process waiting for?)."""
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=sys.stderr)
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


def _loop_factory():
    try:
        import uvloop
    except ImportError:  # uvloop is optional (absent on Windows)
        return None
    return uvloop.new_event_loop
