"""Every `swarmnet` command line of the deployment assets, as argv after the `swarmnet` executable.

- `k8s_commands(repo)`: the containers of deploy/k8s/*.yaml that run swarmnet. The swarmnet images'
  entrypoint is `swarmnet`, so a container's `args` are the argv; a `command` starting with a
  `swarmnet` executable is stripped of it and followed by the `args`.
- `systemd_commands(repo)`: the `ExecStart=` of deploy/systemd/*.service whose executable is `swarmnet`.

Kubernetes' `$(VAR)` references (e.g. `--host $(POD_IP)`) are returned as written: Kubernetes
substitutes them at container start, and they stand where a string is expected.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path

import yaml

SWARMNET_IMAGES = ("swarmnet/peer", "swarmnet/coordinator")
"""Repositories of the images whose entrypoint is `swarmnet` (a registry prefix is allowed)."""

POD_TEMPLATE_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")

EXEC_PREFIXES = "-@:+!"
"""Characters systemd allows before an `Exec*=` executable (ignore failure, argv0, no env expansion...)."""


def k8s_commands(repo: Path) -> list[tuple[str, list[str]]]:
    """(where, argv) for every swarmnet container of the manifests; `where` is `file:Kind/name:container`."""
    found = []
    for path in sorted((Path(repo) / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not isinstance(doc, dict):
                continue
            for container in _containers(doc):
                argv = _container_argv(container)
                if argv is not None:
                    where = f"{path.relative_to(repo)}:{doc['kind']}/{doc['metadata']['name']}:{container['name']}"
                    found.append((where, argv))
    return found


def systemd_commands(repo: Path) -> list[tuple[str, list[str]]]:
    """(where, argv) for every `ExecStart=` running swarmnet; `where` is `file:ExecStart`."""
    found = []
    for path in sorted((Path(repo) / "deploy" / "systemd").glob("*.service")):
        for section, key, value in read_unit(path):
            if section != "Service" or key != "ExecStart" or not value:
                continue
            words = shlex.split(value)
            executable = words[0].lstrip(EXEC_PREFIXES)
            if Path(executable).name == "swarmnet":
                found.append((f"{path.relative_to(repo)}:{key}", words[1:]))
    return found


def read_unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a systemd unit file in order, repeated keys kept, lines ending in a
    backslash joined with the next (as systemd reads them), comments skipped."""
    entries = []
    section = ""
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if pending and line and line[0] in "#;":  # systemd skips comments inside a continuation
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: not a `key=value` line: {raw!r}")
        entries.append((section, key.strip(), value.strip()))
    if pending:
        raise ValueError(f"{path}: the last line ends with a backslash")
    return entries


def _containers(doc: dict) -> Iterator[dict]:
    kind = doc.get("kind")
    if kind == "Pod":
        spec = doc.get("spec") or {}
    elif kind in POD_TEMPLATE_KINDS:
        spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        job = ((doc.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}
        spec = (job.get("template") or {}).get("spec") or {}
    else:
        return
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def _container_argv(container: dict) -> list[str] | None:
    """The argv after `swarmnet`, or None when the container does not run swarmnet."""
    command = [str(word) for word in container.get("command") or []]
    args = [str(word) for word in container.get("args") or []]
    if command:
        if Path(command[0]).name != "swarmnet":
            return None
        return command[1:] + args
    if _image_repository(container.get("image", "")) in SWARMNET_IMAGES:
        return args
    return None


def _image_repository(image: str) -> str:
    """`registry.example.org:5000/swarmnet/peer:0.1.0-cuda@sha256:...` -> `swarmnet/peer`."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    parts = name.split("/")
    if len(parts) > 2 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    return "/".join(parts)
