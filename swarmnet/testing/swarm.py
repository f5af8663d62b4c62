"""`LocalSwarm`: a coordinator, stage and expert peers and trainers as real local processes on 127.0.0.1.

Used by the demo and by the integration tests. Every process it starts is stopped (SIGTERM, then
SIGKILL of its process group) and reaped when the swarm is closed, even after a failure.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarmnet.config import DataConfig, ModelConfig, OptimizerConfig, RunManifest, TrainingConfig
from swarmnet.testing.processes import ManagedProcess, child_env, swarmnet_command
from swarmnet.testing.toml import dump_toml

STARTUP_TIMEOUT = 90.0


def tiny_manifest(name: str = "tiny", **training) -> RunManifest:
    """A run small enough for a 2-core CI machine: a few ms per microbatch."""
    return RunManifest(
        name=name,
        model=ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=32),
        optimizer=OptimizerConfig(lr=3e-3),
        data=DataConfig(max_bytes=400_000),
        training=TrainingConfig(
            **{"num_stages": 2, "microbatch_size": 4, "seq_len": 32, "target_batch_size": 16, "seed": 1, **training}
        ),
    )


class LocalSwarm:
    def __init__(
        self,
        manifest: RunManifest,
        *,
        workdir: str | Path | None = None,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ):
        self.manifest = manifest
        self.host = host
        """Interface every process listens on (a veth address when a test partitions peers)."""
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="swarmnet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run_path = self.workdir / "run.toml"
        self.run_path.write_text(dump_toml(manifest.to_dict()))
        self.env = child_env(env)
        self.processes: list[ManagedProcess] = []
        self.coordinator: ManagedProcess | None = None
        self._count = 0

    @property
    def initial_peers(self) -> list[str]:
        if self.coordinator is None or self.coordinator.ready is None:
            raise RuntimeError("the coordinator is not running")
        return list(self.coordinator.ready["maddrs"])

    def spawn(
        self, name: str, *args: str, env: dict[str, str] | None = None, wrap: Callable[[list[str]], list[str]] | None = None
    ) -> ManagedProcess:
        """Starts `swarmnet *args`; `wrap` rewrites the command (e.g. to run it in a namespace)."""
        self._count += 1
        command = swarmnet_command(*args)
        process = ManagedProcess(
            f"{self._count:02d}-{name}", wrap(command) if wrap else command, log_dir=self.workdir,
            env={**self.env, **(env or {})},
        )
        self.processes.append(process)
        return process

    def start_coordinator(self, *extra: str, wait: bool = True) -> ManagedProcess:
        """Starts (or restarts: same identity key) the coordinator."""
        self.coordinator = self.spawn(
            "coordinator", "coordinator", "--run", str(self.run_path), "--identity", str(self.workdir / "coordinator.key"),
            "--host", self.host, "--http-port", "0", *extra,
        )
        if wait:
            self.coordinator.wait_event("ready", STARTUP_TIMEOUT)
        return self.coordinator

    def start_peer(
        self,
        stage: int | str = "auto",
        *extra: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
        initial_peers: list[str] | None = None,
        host: str | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> ManagedProcess:
        peer = self.spawn(
            f"peer-s{stage}", "join", "--initial-peers", *(initial_peers or self.initial_peers), "--stage", str(stage),
            "--host", host or self.host, *extra, env=env, wrap=wrap,
        )
        if wait:
            peer.wait_event("ready", STARTUP_TIMEOUT)
        return peer

    def start_expert(self, expert: str = "auto", *extra: str, wait: bool = True) -> ManagedProcess:
        """Starts a peer serving an expert of the run's MoE layers (`join --expert`)."""
        peer = self.spawn(
            f"expert-{expert}", "join", "--initial-peers", *self.initial_peers, "--expert", expert, "--host", self.host, *extra
        )
        if wait:
            peer.wait_event("ready", STARTUP_TIMEOUT)
        return peer

    def start_trainer(self, *extra: str, initial_peers: list[str] | None = None) -> ManagedProcess:
        return self.spawn("trainer", "train", "--initial-peers", *(initial_peers or self.initial_peers), "--host", self.host, *extra)

    def start_peers(self, stages: list[int | str], *extra: str) -> list[ManagedProcess]:
        """Starts several peers at once, then waits until each is serving."""
        peers = [self.start_peer(s, *extra, wait=False) for s in stages]
        for peer in peers:
            peer.wait_event("ready", STARTUP_TIMEOUT)
        return peers

    def close(self) -> None:
        """Stops every process: SIGTERM to all at once (newest first: trainers, peers, then the
        coordinator), then waits for each and SIGKILLs its process group if it lingers."""
        errors: list[BaseException] = []
        for process in reversed(self.processes):
            if process.alive:
                process.signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.stop()
            except BaseException as e:  # keep reaping the others, re-raise afterwards
                errors.append(e)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
