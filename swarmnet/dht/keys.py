"""Every DHT key name swarmnet uses, in one place.

Keys are namespaced `swarmnet/...`; records under them are stored with a subkey equal to the
signer's peer id (see `records.py`), so each owner has its own slot and nobody can overwrite it.
"""

from __future__ import annotations

PREFIX = "swarmnet/"

MANIFESTS = PREFIX + "manifests"
"""Run manifests, one subkey per coordinator peer id."""


def stage_key(run_id: str, stage: int) -> str:
    """Servers of one pipeline stage: subkey = peer id → `StageServerRecord`."""
    return f"{PREFIX}{run_id}/stage/{stage}"


def expert_key(run_id: str, prefix: str) -> str:
    """Servers of the experts whose uids start with `prefix` (one MoE layer, `expert.3.`): subkey =
    peer id → `StageServerRecord` with its `expert` uid. One read finds a layer's live experts."""
    return f"{PREFIX}{run_id}/experts/{prefix}"


def progress_key(run_id: str, stage: int) -> str:
    """Progress of one unit's current step (a stage, or an expert by its unit index): subkey =
    peer id → `ProgressRecord`."""
    return f"{PREFIX}{run_id}/stage/{stage}/progress"


def trainer_key(run_id: str) -> str:
    """Trainers of a run: subkey = peer id → `TrainerRecord`."""
    return f"{PREFIX}{run_id}/trainers"


def archive_key(run_id: str) -> str:
    """Stage state archives of a run (the coordinator's): subkey = peer id → `ArchiveRecord`."""
    return f"{PREFIX}{run_id}/archive"


def record_kind_for_key(key: str) -> str | None:
    """Which record type a key holds (used by the validator); None for non-swarmnet keys."""
    if key == MANIFESTS:
        return "manifest"
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX) :].split("/")
    if len(parts) == 3 and parts[1] == "stage" and parts[2].isdigit():
        return "stage_server"
    if len(parts) == 4 and parts[1] == "stage" and parts[2].isdigit() and parts[3] == "progress":
        return "progress"
    if len(parts) == 3 and parts[1] == "experts" and parts[2]:
        return "stage_server"
    if len(parts) == 2 and parts[1] == "trainers":
        return "trainer"
    if len(parts) == 2 and parts[1] == "archive":
        return "archive"
    return "unknown"
