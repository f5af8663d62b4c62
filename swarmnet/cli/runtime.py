"""Running one role on one event loop: uvloop if present, signals, typed errors to exit codes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from swarmnet.errors import ConfigError, SwarmnetError
from swarmnet.telemetry.logs import setup_logging

logger = logging.getLogger("swarmnet.cli")

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130
JOIN_TOKEN_ENV = "SWARMNET_JOIN_TOKEN"


def add_join_token_option(parser) -> None:
    parser.add_argument(
        "--join-token-file", default=None, metavar="FILE",
        help=f"file holding the join token of a private run (default: ${JOIN_TOKEN_ENV}); never logged",
    )


def read_join_token(path: str | None) -> str | None:
    """The join token from `--join-token-file`, else `$SWARMNET_JOIN_TOKEN`, else None. A file
    rather than a flag: command lines are visible to every user of the machine (`ps`)."""
    if path:
        try:
            token = open(path, encoding="utf-8").read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the join token file {path}: {e.strerror}") from e
        if not token:
            raise ConfigError(f"the join token file {path} is empty")
        return token
    return os.environ.get(JOIN_TOKEN_ENV, "").strip() or None


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
