"""Real swarmnet processes under supervision: start, wait on their events, stop, reap.

Each child runs in its own session (process group) so that its p2pd dies with it; its stdout is
read by a thread that collects `@swarmnet` events (see `swarmnet.telemetry.events`), its stderr goes
to a log file. Waiting is always on a condition with a deadline, never a sleep.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from swarmnet.telemetry import events

Event = dict[str, Any]


class ProcessFailed(RuntimeError):
    """A supervised process exited or did not reach the awaited state in time."""


class ManagedProcess:
    def __init__(self, name: str, args: Sequence[str], *, log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.args = list(args)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.terminated = False
        """SIGTERM was sent (the process is leaving gracefully)."""
        self.started_at = time.monotonic()
        self.events: list[Event] = []
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_stdout, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            event = events.parse(line)
            with self._changed:
                if event is not None:
                    event["received_after_s"] = round(time.monotonic() - self.started_at, 3)
                    self.events.append(event)
                else:
                    self.output.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_event(self, predicate: Callable[[Event], bool] | str, timeout: float) -> Event:
        """The first event matching `predicate` (or named so); raises `ProcessFailed` on exit/timeout."""
        return self.wait_event_from(0, predicate, timeout)[1]

    def wait_event_from(
        self, start: int, predicate: Callable[[Event], bool] | str, timeout: float
    ) -> tuple[int, Event]:
        """Like `wait_event`, looking only at events from index `start`; returns (index, event)."""
        if isinstance(predicate, str):
            name = predicate
            predicate = lambda e: e.get("event") == name  # noqa: E731
        deadline = time.monotonic() + timeout
        seen = start
        with self._changed:
            while True:
                for index in range(seen, len(self.events)):
                    if predicate(self.events[index]):
                        return index, self.events[index]
                seen = max(seen, len(self.events))
                if not self._reader.is_alive():
                    raise ProcessFailed(f"{self.name} exited with {self.popen.poll()}\n{self.describe()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProcessFailed(f"{self.name}: timed out after {timeout:.0f} s\n{self.describe()}")
                self._changed.wait(min(remaining, 1.0))

    @property
    def ready(self) -> Event | None:
        return next((e for e in self.events if e.get("event") == "ready"), None)

    def describe(self, lines: int = 40) -> str:
        log = self.log_path.read_text(errors="replace").splitlines()[-lines:] if self.log_path.exists() else []
        return "\n".join([f"--- {self.name} stdout tail ---", *list(self.output)[-lines:], "--- stderr tail ---", *log])

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        if sig == signal.SIGTERM:
            self.terminated = True

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (unless sent already: a second one aborts a graceful leave), wait up to
        `timeout`, then SIGKILL the whole process group; removes stale sockets."""
        if self.alive:
            if not self.terminated:
                self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the process and everything in its group (its p2pd), reap it, remove its sockets."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self._reader.join(timeout=5)
        reported = {path for event in list(self.events) for path in event.get("sockets", [])}
        for path in reported:
            with contextlib.suppress(FileNotFoundError, OSError):
                os.unlink(path)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


def swarmnet_command(*args: str) -> list[str]:
    """argv running the swarmnet CLI with this interpreter."""
    return [sys.executable, "-m", "swarmnet.cli", *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env[events.ENV] = "1"
    env.update(extra or {})
    return env


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by the live processes among `pids` (all their threads),
    read from /proc; processes that are gone count for nothing."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")
