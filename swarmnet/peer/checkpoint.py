"""Durable, atomic, verified checkpoint files of stage state snapshots.

A checkpoint file holds one `StateSnapshot` (see `swarmnet.averaging.state`) of one stage of one
run. Layout, in order:

1. the magic line `b"swarmnet-checkpoint/1\\n"`;
2. a 4-byte big-endian unsigned length `n` (at most `MAX_META_BYTES`), then `n` bytes of a msgpack
   map, the meta: `{"run_id": str, "stage": int, "step": int, "digest": str (sha256 hex),
   "header_bytes": int, "data_bytes": int, "saved_at": float (unix time)}`;
3. `header_bytes` bytes: the snapshot's canonical header, `encode_header(step, entries)` (at most
   `MAX_HEADER_BYTES`);
4. `data_bytes` bytes: the snapshot's data, every tensor's raw bytes in entry order.

Nothing follows the data. Reading validates everything before returning: the magic, the meta's keys,
types and bounds, that the sizes add up to the file's length, the header (`decode_header`), that its
step and data size agree with the meta, the run and stage when the caller names them, and finally the
sha256 digest recomputed over header and data. Any problem raises `CheckpointError`; nothing is ever
unpickled.

Writing is atomic: the file is written to a uniquely named temporary file in the target's directory
(`.<name>.<pid>.<random>.tmp`), flushed and fsynced, renamed onto the target with `os.replace`, and
the directory is fsynced, so a crash leaves either the old file or the new one, never a mix (a crash
mid-write may leave a temporary file behind; readers ignore those and `CheckpointStore` removes stale
ones).

`CheckpointStore` keeps the newest few checkpoints of each stage of one run in
`root/<run_id>/stage-<stage>/step-<step:09d>.ckpt` and finds the newest readable one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack

from swarmnet.averaging.state import (
    StateSnapshot,
    TensorEntry,
    check_entry,
    compute_digest,
    decode_header,
    encode_header,
)
from swarmnet.errors import StateSyncError

logger = logging.getLogger(__name__)

MAGIC = b"swarmnet-checkpoint/1\n"
MAX_META_BYTES = 64 * 1024
MAX_HEADER_BYTES = 8 * 1024 * 1024
"""Same bound as the state protocol's: a snapshot whose header is larger could not be served anyway."""
MAX_RUN_ID_CHARS = 256
SUFFIX = ".ckpt"
TMP_SUFFIX = ".tmp"
STALE_TMP_SECONDS = 3600.0
"""A temporary file untouched for this long is left over from a crashed write; `save` removes it."""

_LENGTH = struct.Struct(">I")
_META_KEYS = frozenset({"run_id", "stage", "step", "digest", "header_bytes", "data_bytes", "saved_at"})
_DIGEST = re.compile(r"[0-9a-f]{64}")
_STEP_FILE = re.compile(r"step-(\d{9,})" + re.escape(SUFFIX))
_STAGE_DIR = re.compile(r"stage-(\d+)")
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]+")
_READ_CHUNK = 4 * 1024 * 1024


class CheckpointError(StateSyncError):
    """A checkpoint file could not be written, read or verified."""


@dataclass(frozen=True)
class CheckpointMeta:
    """The meta map of a checkpoint file."""

    run_id: str
    stage: int
    step: int
    digest: str
    header_bytes: int
    data_bytes: int
    saved_at: float


# --- single files ---------------------------------------------------------------------------------


def write_checkpoint(path: Path, run_id: str, stage: int, snapshot: StateSnapshot) -> None:
    """Atomically writes `snapshot` of `stage` of run `run_id` to `path`, creating parent directories.

    Verifies the snapshot first (valid entries, data length, digest), so a file that could never be
    read back is never written. On any failure the previous file at `path`, if any, is left intact,
    no temporary file is left behind, and `CheckpointError` is raised.
    """
    path = Path(path)
    if not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_RUN_ID_CHARS:
        raise CheckpointError(f"invalid run id {run_id!r:.80}")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
        raise CheckpointError(f"invalid stage {stage!r}")
    header = _check_snapshot(snapshot)
    meta = msgpack.packb(
        {
            "run_id": run_id,
            "stage": stage,
            "step": snapshot.step,
            "digest": snapshot.digest,
            "header_bytes": len(header),
            "data_bytes": len(snapshot.data),
            "saved_at": time.time(),
        },
        use_bin_type=True,
    )
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    try:
        _make_dirs(directory)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        with open(fd, "wb") as f:
            f.write(MAGIC)
            f.write(_LENGTH.pack(len(meta)))
            f.write(meta)
            f.write(header)
            f.write(snapshot.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {e}") from e
        raise


def read_checkpoint(path: Path, *, run_id: str | None = None, stage: int | None = None) -> StateSnapshot:
    """Reads and fully verifies the checkpoint at `path`; raises `CheckpointError` on any problem,
    including a run or stage other than `run_id` / `stage` when those are given."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            meta, step, entries = _read_prefix(f, path, run_id, stage)
            data = bytearray(meta.data_bytes)
            view = memoryview(data)
            filled = 0
            while filled < len(data):
                n = f.readinto(view[filled:])
                if not n:
                    raise CheckpointError(f"{path}: truncated data")
                filled += n
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if compute_digest(step, entries, data) != meta.digest:
        raise CheckpointError(f"{path}: digest does not match the content (corrupted file)")
    return StateSnapshot(step=step, entries=entries, data=view, digest=meta.digest)


def read_checkpoint_meta(
    path: Path, *, run_id: str | None = None, stage: int | None = None
) -> CheckpointMeta:
    """The meta of the checkpoint at `path`, after checking everything but the data's digest (cheap:
    reads only the magic, meta and header)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            meta, _, _ = _read_prefix(f, path, run_id, stage)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    return meta


def verify_checkpoint(path: Path, *, run_id: str | None = None, stage: int | None = None) -> CheckpointMeta:
    """Like `read_checkpoint` but hashes the data in chunks without keeping it; returns the meta."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            meta, step, entries = _read_prefix(f, path, run_id, stage)
            digest = hashlib.sha256(encode_header(step, entries))  # same as `compute_digest`
            remaining = meta.data_bytes
            while remaining:
                chunk = f.read(min(remaining, _READ_CHUNK))
                if not chunk:
                    raise CheckpointError(f"{path}: truncated data")
                digest.update(chunk)
                remaining -= len(chunk)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if digest.hexdigest() != meta.digest:
        raise CheckpointError(f"{path}: digest does not match the content (corrupted file)")
    return meta


# --- store ----------------------------------------------------------------------------------------


class CheckpointStore:
    """The newest `keep` checkpoints of each stage of one run, under `root/<run_id>/stage-<n>/`.

    Holds no mutable state besides the filesystem, so it may be used from any thread (each write goes
    through its own uniquely named temporary file).
    """

    def __init__(self, root: Path, run_id: str, keep: int = 2):
        _check_path_parts(run_id, 0)
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, not {keep!r}")
        self.root = Path(root)
        self.run_id = run_id
        self.keep = keep

    @property
    def run_dir(self) -> Path:
        return self.root / self.run_id

    def stage_dir(self, stage: int) -> Path:
        _check_path_parts(self.run_id, stage)
        return self.run_dir / f"stage-{stage}"

    def path_for(self, stage: int, step: int) -> Path:
        return self.stage_dir(stage) / f"step-{step:09d}{SUFFIX}"

    def save(self, stage: int, snapshot: StateSnapshot) -> Path:
        """Writes `snapshot` atomically and prunes the stage to its newest `keep` checkpoints (never
        removing the one just written); returns its path. A no-op when a valid checkpoint of the same
        step and digest is already there."""
        if not isinstance(snapshot.step, int) or isinstance(snapshot.step, bool) or snapshot.step < 0:
            raise CheckpointError(f"invalid step {snapshot.step!r}")
        path = self.path_for(stage, snapshot.step)
        if path.exists():
            try:
                if verify_checkpoint(path, run_id=self.run_id, stage=stage).digest == snapshot.digest:
                    # Still prune: a concurrent saver that lagged behind may have written an older
                    # step after the last prune (it never removes the file it has just written).
                    self._prune(stage, path)
                    return path
            except CheckpointError as e:
                logger.warning("overwriting unreadable checkpoint %s: %s", path, e)
        write_checkpoint(path, self.run_id, stage, snapshot)
        self._prune(stage, path)
        return path

    def latest(self, stage: int) -> StateSnapshot | None:
        """The newest readable checkpoint of `stage`, or None; corrupt files are skipped with a warning."""
        for step, path in reversed(self._files(stage)):
            try:
                snapshot = read_checkpoint(path, run_id=self.run_id, stage=stage)
            except CheckpointError as e:
                if isinstance(e.__cause__, FileNotFoundError):
                    continue  # pruned by a concurrent save
                logger.warning("skipping unreadable checkpoint %s: %s", path, e)
                continue
            if snapshot.step != step:
                logger.warning("skipping checkpoint %s: it holds step %d", path, snapshot.step)
                continue
            return snapshot
        return None

    def latest_step(self, stage: int) -> int | None:
        """The step of the newest checkpoint file of `stage` by name (its content is not read)."""
        files = self._files(stage)
        return files[-1][0] if files else None

    def stages(self) -> list[int]:
        """The stages with at least one checkpoint file, ascending."""
        try:
            children = list(self.run_dir.iterdir())
        except FileNotFoundError:
            return []
        found = []
        for child in children:
            match = _STAGE_DIR.fullmatch(child.name)
            if match and child.is_dir() and self._files(int(match.group(1))):
                found.append(int(match.group(1)))
        return sorted(found)

    def _files(self, stage: int) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint file of `stage`, by ascending step."""
        try:
            children = list(self.stage_dir(stage).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        files = []
        for child in children:
            match = _STEP_FILE.fullmatch(child.name)
            if match:
                files.append((int(match.group(1)), child))
        return sorted(files)

    def _prune(self, stage: int, written: Path) -> None:
        files = self._files(stage)
        for _, path in files[: max(0, len(files) - self.keep)]:
            if path != written:
                _remove(path)
        now = time.time()
        with contextlib.suppress(OSError):
            for child in self.stage_dir(stage).iterdir():
                if child.name.startswith(".") and child.name.endswith(TMP_SUFFIX):
                    with contextlib.suppress(OSError):
                        if now - child.stat().st_mtime > STALE_TMP_SECONDS:
                            _remove(child)


# --- helpers --------------------------------------------------------------------------------------


def _read_prefix(
    f: BinaryIO, path: Path, run_id: str | None, stage: int | None
) -> tuple[CheckpointMeta, int, list[TensorEntry]]:
    """Reads and checks magic, meta and header; leaves `f` at the start of the data."""
    size = os.fstat(f.fileno()).st_size
    if _read_exact(f, len(MAGIC), path, "magic") != MAGIC:
        raise CheckpointError(f"{path}: not a swarmnet checkpoint (bad magic)")
    (meta_len,) = _LENGTH.unpack(_read_exact(f, _LENGTH.size, path, "meta length"))
    if meta_len > MAX_META_BYTES:
        raise CheckpointError(f"{path}: meta of {meta_len} bytes exceeds {MAX_META_BYTES}")
    meta = _parse_meta(_read_exact(f, meta_len, path, "meta"), path)
    expected = len(MAGIC) + _LENGTH.size + meta_len + meta.header_bytes + meta.data_bytes
    if size != expected:
        raise CheckpointError(f"{path}: file has {size} bytes, its meta implies {expected} (truncated?)")
    if run_id is not None and meta.run_id != run_id:
        raise CheckpointError(f"{path}: checkpoint of run {meta.run_id!r}, not {run_id!r}")
    if stage is not None and meta.stage != stage:
        raise CheckpointError(f"{path}: checkpoint of stage {meta.stage}, not {stage}")
    try:
        step, entries = decode_header(_read_exact(f, meta.header_bytes, path, "header"), CheckpointError)
    except CheckpointError as e:
        raise CheckpointError(e.args[0] if str(path) in str(e) else f"{path}: {e}") from e
    if step != meta.step:
        raise CheckpointError(f"{path}: header step {step} differs from meta step {meta.step}")
    if sum(e.nbytes for e in entries) != meta.data_bytes:
        raise CheckpointError(f"{path}: data size does not match the header's tensors")
    return meta, step, entries


def _parse_meta(blob: bytes, path: Path) -> CheckpointMeta:
    try:
        raw = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise CheckpointError(f"{path}: malformed meta: {e}") from e
    if not isinstance(raw, dict) or set(raw) != _META_KEYS:
        raise CheckpointError(f"{path}: meta is not a map of {sorted(_META_KEYS)}")

    def count(key: str, upper: int | None = None) -> int:
        value = raw[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{path}: meta {key} is not a non-negative int")
        if upper is not None and value > upper:
            raise CheckpointError(f"{path}: meta {key} {value} exceeds {upper}")
        return value

    run_id, digest, saved_at = raw["run_id"], raw["digest"], raw["saved_at"]
    if not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_RUN_ID_CHARS:
        raise CheckpointError(f"{path}: meta run_id is invalid")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise CheckpointError(f"{path}: meta digest is not a sha256 hex digest")
    if not isinstance(saved_at, (int, float)) or isinstance(saved_at, bool) or not math.isfinite(saved_at):
        raise CheckpointError(f"{path}: meta saved_at is not a finite number")
    return CheckpointMeta(
        run_id=run_id,
        stage=count("stage"),
        step=count("step"),
        digest=digest,
        header_bytes=count("header_bytes", MAX_HEADER_BYTES),
        data_bytes=count("data_bytes"),
        saved_at=float(saved_at),
    )


def _read_exact(f: BinaryIO, n: int, path: Path, what: str) -> bytes:
    blob = f.read(n)
    if len(blob) != n:
        raise CheckpointError(f"{path}: truncated {what}")
    return blob


def _check_path_parts(run_id: str, stage: int) -> None:
    """Raises `ValueError` unless `run_id` and `stage` are safe to use as path components."""
    if not isinstance(run_id, str) or len(run_id) > MAX_RUN_ID_CHARS or not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"invalid run id {run_id!r:.80}")
    if run_id in (".", ".."):
        raise ValueError(f"invalid run id {run_id!r}")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
        raise ValueError(f"invalid stage {stage!r}")


def _check_snapshot(snapshot: StateSnapshot) -> bytes:
    """Raises `CheckpointError` unless `snapshot` is consistent; returns its canonical header."""
    step = snapshot.step
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"invalid step {step!r}")
    for entry in snapshot.entries:
        check_entry(entry, CheckpointError)
    if len({e.name for e in snapshot.entries}) != len(snapshot.entries):
        raise CheckpointError("snapshot repeats an entry name")
    if sum(e.nbytes for e in snapshot.entries) != len(snapshot.data):
        raise CheckpointError("snapshot data length does not match its entries")
    header = encode_header(step, snapshot.entries)
    if len(header) > MAX_HEADER_BYTES:
        raise CheckpointError(f"snapshot header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    if compute_digest(step, snapshot.entries, snapshot.data) != snapshot.digest:
        raise CheckpointError("snapshot digest does not match its content")
    return header


def _make_dirs(directory: Path) -> None:
    """`mkdir -p`, fsyncing the parent of every directory it creates."""
    missing = []
    d = directory
    while not d.exists() and d.parent != d:
        missing.append(d)
        d = d.parent
    directory.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):
        _fsync_dir(d.parent)


def _fsync_dir(directory: Path) -> None:
    """Makes a rename or creation inside `directory` durable (a no-op where directories cannot be
    opened, i.e. Windows)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        logger.warning("cannot remove %s: %s", path, e)
