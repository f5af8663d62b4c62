"""Rewrites the ConfigMaps of deploy/k8s that are copies of files kept elsewhere in the repository.

kustomize refuses `configMapGenerator` files outside the kustomization's directory, so the run
manifest and the alert rules are copied into plain ConfigMaps; tests/deploy/test_k8s_systemd.py
fails when a copy differs from its source. After editing a source, run from the repository root:

    python deploy/k8s/sync_copies.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

K8S = Path(__file__).resolve().parent
REPO = K8S.parent.parent


@dataclass(frozen=True)
class Copy:
    """One ConfigMap holding one file of the repository under one key."""

    target: str
    """File under deploy/k8s written by this script."""
    name: str
    """The ConfigMap's name."""
    key: str
    """The key of `data` holding the file (the file name where the ConfigMap is mounted)."""
    source: str
    """The copied file, relative to the repository root."""
    purpose: str
    """One line for the generated file's header."""


COPIES = (
    Copy(
        target="coordinator-run.yaml",
        name="swarmnet-run",
        key="demo.toml",
        source="coordinator/runs/demo.toml",
        purpose="The run manifest the coordinator publishes, mounted at /etc/swarmnet/coordinator/runs/.",
    ),
    Copy(
        target="prometheus-rules.yaml",
        name="prometheus-rules",
        key="swarmnet.yml",
        source="deploy/prometheus/rules/swarmnet.yml",
        purpose="Prometheus' alert rules, mounted at /etc/prometheus/rules/.",
    ),
)


def render(copy: Copy, text: str) -> str:
    """The ConfigMap as YAML, `text` in a literal block scalar so that it reads as the file does."""
    chomp = "+" if text.endswith("\n\n") else ("" if text.endswith("\n") else "-")
    indicator = "2" if text[:1] in (" ", "\n") else ""  # a leading space needs an explicit indent
    body = "".join(f"    {line}" if line.strip("\n") else line for line in text.splitlines(keepends=True))
    return (
        f"# GENERATED from {copy.source} by deploy/k8s/sync_copies.py: edit the source, then run the script.\n"
        f"# {copy.purpose}\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        f"  name: {copy.name}\n"
        "  namespace: swarmnet\n"
        "  labels:\n"
        "    app.kubernetes.io/part-of: swarmnet\n"
        "data:\n"
        f"  {copy.key}: |{indicator}{chomp}\n"
        f"{body}"
    )


def expected(copy: Copy, repo: Path = REPO) -> str:
    return render(copy, (repo / copy.source).read_text(encoding="utf-8"))


def main() -> int:
    for copy in COPIES:
        target = K8S / copy.target
        text = expected(copy)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(REPO)} from {copy.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
