"""Checkpoint files: exact round trips, refusal of every kind of corruption, atomic replacement, and a
store that keeps the newest few per stage and falls back past a corrupt newest file."""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path

import msgpack
import pytest
import torch

from swarmnet.averaging.state import (
    StateSnapshot,
    TensorEntry,
    compute_digest,
    encode_header,
    load_state,
    snapshot_state,
)
from swarmnet.config import ModelConfig, OptimizerConfig, RunManifest, TrainingConfig
from swarmnet.errors import StateSyncError
from swarmnet.models.partition import build_stage
from swarmnet.peer import checkpoint
from swarmnet.peer.checkpoint import (
    MAGIC,
    MAX_META_BYTES,
    CheckpointError,
    CheckpointStore,
    read_checkpoint,
    read_checkpoint_meta,
    verify_checkpoint,
    write_checkpoint,
)
from swarmnet.peer.compute import StageComputer

pytestmark = pytest.mark.timeout(60)

RUN = "0123456789abcdef"
ENTRIES = [
    TensorEntry("w", "float32", [4, 3]),
    TensorEntry("b", "bfloat16", [3]),
    TensorEntry("opt.w.step", "float32", []),
    TensorEntry("ids", "int64", [2, 0]),
]


def snapshot(step: int = 7, seed: int = 0, entries: list[TensorEntry] = ENTRIES) -> StateSnapshot:
    size = sum(e.nbytes for e in entries)
    data = bytes((seed * 31 + i * 7) % 256 for i in range(size))
    return StateSnapshot(step=step, entries=entries, data=data, digest=compute_digest(step, entries, data))


def assemble(meta: object, header: bytes, data: bytes, meta_len: int | None = None) -> bytes:
    blob = msgpack.packb(meta, use_bin_type=True)
    return MAGIC + struct.pack(">I", len(blob) if meta_len is None else meta_len) + blob + header + data


def valid_meta(snap: StateSnapshot, **changes: object) -> dict[str, object]:
    meta = {
        "run_id": RUN,
        "stage": 1,
        "step": snap.step,
        "digest": snap.digest,
        "header_bytes": len(encode_header(snap.step, snap.entries)),
        "data_bytes": snap.total_bytes,
        "saved_at": 1.5,
    }
    meta.update(changes)
    return meta


def tmp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


# --- single files -----------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path):
    snap = snapshot()
    path = tmp_path / "a" / "b" / "x.ckpt"
    before = time.time()
    write_checkpoint(path, RUN, 1, snap)
    back = read_checkpoint(path, run_id=RUN, stage=1)
    assert back.step == snap.step and back.entries == snap.entries and back.digest == snap.digest
    assert bytes(back.data) == bytes(snap.data)
    assert read_checkpoint(path) == back  # run and stage are optional
    meta = read_checkpoint_meta(path)
    assert (meta.run_id, meta.stage, meta.step, meta.digest) == (RUN, 1, 7, snap.digest)
    assert meta.data_bytes == snap.total_bytes and before <= meta.saved_at <= time.time()
    assert verify_checkpoint(path, run_id=RUN, stage=1) == meta
    assert path.read_bytes().startswith(b"swarmnet-checkpoint/1\n")
    assert tmp_files(tmp_path) == []


def test_round_trip_of_an_empty_snapshot(tmp_path: Path):
    snap = snapshot(step=0, entries=[])
    write_checkpoint(tmp_path / "e.ckpt", RUN, 0, snap)
    back = read_checkpoint(tmp_path / "e.ckpt")
    assert back.entries == [] and back.total_bytes == 0 and back.digest == snap.digest


def test_overwrite_replaces_the_file(tmp_path: Path):
    path = tmp_path / "x.ckpt"
    write_checkpoint(path, RUN, 1, snapshot(seed=1))
    write_checkpoint(path, RUN, 1, snapshot(seed=2))
    assert read_checkpoint(path).digest == snapshot(seed=2).digest


def test_run_and_stage_mismatch(tmp_path: Path):
    path = tmp_path / "x.ckpt"
    write_checkpoint(path, RUN, 1, snapshot())
    with pytest.raises(CheckpointError, match="run"):
        read_checkpoint(path, run_id="another", stage=1)
    with pytest.raises(CheckpointError, match="stage"):
        read_checkpoint(path, run_id=RUN, stage=0)
    with pytest.raises(CheckpointError, match="stage"):
        read_checkpoint_meta(path, stage=2)
    assert issubclass(CheckpointError, StateSyncError)


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


def _corruptions() -> dict[str, bytes]:
    snap = snapshot()
    header = encode_header(snap.step, snap.entries)
    data = bytes(snap.data)
    good = assemble(valid_meta(snap), header, data)
    meta_len = len(msgpack.packb(valid_meta(snap), use_bin_type=True))
    header_at = len(MAGIC) + 4 + meta_len
    other = snapshot(step=8)
    return {
        "flipped last data byte": _flip(good, len(good) - 1),
        "flipped first data byte": _flip(good, header_at + len(header)),
        "flipped header byte": _flip(good, header_at + len(header) - 3),
        "truncated data": good[:-1],
        "truncated header": good[: header_at + 5],
        "truncated meta": good[: len(MAGIC) + 4 + 3],
        "truncated length": good[: len(MAGIC) + 2],
        "magic only": MAGIC,
        "empty": b"",
        "trailing byte": good + b"\0",
        "bad magic": b"swarmnet-checkpoint/2\n" + good[len(MAGIC) :],
        "not a checkpoint": b"PK\x03\x04" + b"\0" * 100,
        "oversized meta length": MAGIC + struct.pack(">I", MAX_META_BYTES + 1) + b"\0" * (MAX_META_BYTES + 1),
        "huge meta length": MAGIC + struct.pack(">I", 0xFFFFFFFF) + b"\0" * 64,
        "garbage meta": MAGIC + struct.pack(">I", 6) + b"\xc1\xc1\xc1\xc1\xc1\xc1" + header + data,
        "meta is a list": assemble([1, 2, 3], header, data),
        "meta missing a key": assemble(
            {k: v for k, v in valid_meta(snap).items() if k != "digest"}, header, data
        ),
        "meta with an extra key": assemble(valid_meta(snap, extra=1), header, data),
        "meta step is a string": assemble(valid_meta(snap, step="7"), header, data),
        "meta stage is a bool": assemble(valid_meta(snap, stage=True), header, data),
        "meta negative data size": assemble(valid_meta(snap, data_bytes=-1), header, data),
        "meta digest not hex": assemble(valid_meta(snap, digest="z" * 64), header, data),
        "meta saved_at is nan": assemble(valid_meta(snap, saved_at=float("nan")), header, data),
        "meta run_id empty": assemble(valid_meta(snap, run_id=""), header, data),
        "meta header too big": assemble(
            valid_meta(snap, header_bytes=checkpoint.MAX_HEADER_BYTES + 1), header, data
        ),
        "meta sizes disagree with file": assemble(
            valid_meta(snap, data_bytes=snap.total_bytes + 1), header, data
        ),
        "meta step differs from header": assemble(valid_meta(snap, step=8), header, data),
        "data size disagrees with entries": assemble(
            valid_meta(snap, data_bytes=snap.total_bytes + 4), header, data + b"\0" * 4
        ),
        "digest of another snapshot": assemble(valid_meta(snap, digest=other.digest), header, data),
        "garbage header": assemble(valid_meta(snap, header_bytes=len(header)), b"\xc1" * len(header), data),
        "header with an unknown dtype": assemble(
            valid_meta(snap, header_bytes=len(encode_header(7, [TensorEntry("w", "float64", [6])]))),
            encode_header(7, [TensorEntry("w", "float64", [6])]),
            data,
        ),
    }


@pytest.mark.parametrize("kind", sorted(_corruptions()))
def test_corruption_is_refused(tmp_path: Path, kind: str):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(_corruptions()[kind])
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        verify_checkpoint(path)


def test_the_test_assembler_builds_a_valid_file(tmp_path: Path):
    snap = snapshot()
    path = tmp_path / "ok.ckpt"
    path.write_bytes(assemble(valid_meta(snap), encode_header(snap.step, snap.entries), bytes(snap.data)))
    assert read_checkpoint(path, run_id=RUN, stage=1).digest == snap.digest


def test_missing_file_and_directory_raise_checkpoint_error(tmp_path: Path):
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path)


def test_an_inconsistent_snapshot_is_never_written(tmp_path: Path):
    snap = snapshot()
    bad_digest = StateSnapshot(step=snap.step, entries=snap.entries, data=snap.data, digest="0" * 64)
    short = StateSnapshot(
        step=snap.step, entries=snap.entries, data=bytes(snap.data)[:-1], digest=snap.digest
    )
    bad_entry = [TensorEntry("w", "float64", [1])]
    unknown_dtype = StateSnapshot(step=1, entries=bad_entry, data=b"\0" * 8, digest=snap.digest)
    for bad in (bad_digest, short, unknown_dtype):
        with pytest.raises(CheckpointError):
            write_checkpoint(tmp_path / "x.ckpt", RUN, 1, bad)
    with pytest.raises(CheckpointError):
        write_checkpoint(tmp_path / "x.ckpt", "", 1, snap)
    with pytest.raises(CheckpointError):
        write_checkpoint(tmp_path / "x.ckpt", RUN, -1, snap)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
):
    path = tmp_path / "x.ckpt"
    old = snapshot(seed=1)
    write_checkpoint(path, RUN, 1, old)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, failing, boom)
    with pytest.raises(CheckpointError, match="No space"):
        write_checkpoint(path, RUN, 1, snapshot(seed=2))
    monkeypatch.undo()
    assert read_checkpoint(path).digest == old.digest
    assert tmp_files(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]


def test_an_interrupted_write_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "x.ckpt", RUN, 1, snapshot())
    assert list(tmp_path.iterdir()) == []


# --- store --------------------------------------------------------------------------------------------


def test_store_layout_and_keep(tmp_path: Path):
    store = CheckpointStore(tmp_path, RUN, keep=2)
    assert store.latest(0) is None and store.latest_step(0) is None and store.stages() == []
    paths = [store.save(0, snapshot(step=s, seed=s)) for s in range(1, 6)]
    assert paths[-1] == tmp_path / RUN / "stage-0" / "step-000000005.ckpt"
    assert sorted(p.name for p in (tmp_path / RUN / "stage-0").iterdir()) == [
        "step-000000004.ckpt",
        "step-000000005.ckpt",
    ]
    assert store.latest_step(0) == 5
    latest = store.latest(0)
    assert latest is not None and latest.step == 5 and latest.digest == snapshot(step=5, seed=5).digest
    store.save(3, snapshot(step=1))
    assert store.stages() == [0, 3]
    assert store.latest_step(1) is None and store.latest(1) is None
    assert min(p.name for p in (tmp_path / RUN / "stage-0").iterdir()) == "step-000000004.ckpt"


def test_store_keeps_one(tmp_path: Path):
    store = CheckpointStore(tmp_path, RUN, keep=1)
    for s in (3, 10, 11):
        store.save(2, snapshot(step=s))
    assert [p.name for p in (tmp_path / RUN / "stage-2").iterdir()] == ["step-000000011.ckpt"]


def test_steps_beyond_nine_digits_sort_numerically(tmp_path: Path):
    store = CheckpointStore(tmp_path, RUN, keep=2)
    store.save(0, snapshot(step=999_999_999))
    store.save(0, snapshot(step=1_000_000_000))
    assert store.latest_step(0) == 1_000_000_000
    latest = store.latest(0)
    assert latest is not None and latest.step == 1_000_000_000


def test_saving_an_older_step_keeps_the_saved_file(tmp_path: Path):
    store = CheckpointStore(tmp_path, RUN, keep=2)
    for s in (10, 11):
        store.save(0, snapshot(step=s))
    path = store.save(0, snapshot(step=5))
    assert path.exists()
    assert store.latest_step(0) == 11
    store.save(0, snapshot(step=12))  # the next save prunes by step
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-000000011.ckpt", "step-000000012.ckpt"]


def test_latest_skips_a_corrupt_newest_file(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    store = CheckpointStore(tmp_path, RUN, keep=3)
    store.save(1, snapshot(step=1, seed=1))
    store.save(1, snapshot(step=2, seed=2))
    newest = store.save(1, snapshot(step=3, seed=3))
    blob = newest.read_bytes()
    newest.write_bytes(_flip(blob, len(blob) - 1))
    with caplog.at_level(logging.WARNING, logger="swarmnet.peer.checkpoint"):
        latest = store.latest(1)
    assert latest is not None and latest.step == 2 and latest.digest == snapshot(step=2, seed=2).digest
    assert any("step-000000003" in r.getMessage() for r in caplog.records)
    store.path_for(1, 2).write_bytes(blob[: len(blob) // 2])  # truncated
    latest = store.latest(1)
    assert latest is not None and latest.step == 1
    assert store.latest_step(1) == 3  # by name only
    store.path_for(1, 1).write_bytes(b"")
    assert store.latest(1) is None


def test_latest_skips_a_file_whose_name_lies_about_its_step(tmp_path: Path):
    store = CheckpointStore(tmp_path, RUN)
    store.save(0, snapshot(step=4))
    store.path_for(0, 4).rename(store.path_for(0, 9))
    assert store.latest_step(0) == 9
    assert store.latest(0) is None


def test_latest_skips_a_checkpoint_of_another_run_or_stage(tmp_path: Path):
    store = CheckpointStore(tmp_path, RUN)
    store.save(0, snapshot(step=1))
    write_checkpoint(store.path_for(0, 2), "other-run", 0, snapshot(step=2))
    write_checkpoint(store.path_for(0, 3), RUN, 1, snapshot(step=3))
    latest = store.latest(0)
    assert latest is not None and latest.step == 1


def test_temp_files_are_ignored(tmp_path: Path):
    store = CheckpointStore(tmp_path, RUN)
    store.save(0, snapshot(step=1))
    (tmp_path / RUN / "stage-0" / ".step-000000009.ckpt.123.abcdef.tmp").write_bytes(b"half written")
    (tmp_path / RUN / "stage-5").mkdir()
    (tmp_path / RUN / "stage-5" / ".step-000000001.ckpt.1.x.tmp").write_bytes(b"x")
    (tmp_path / RUN / "stage-6").mkdir()
    (tmp_path / RUN / "notes.txt").write_text("not a stage")
    assert store.latest_step(0) == 1
    latest = store.latest(0)
    assert latest is not None and latest.step == 1
    assert store.stages() == [0]
    assert store.latest(5) is None


def test_save_removes_only_stale_temp_files(tmp_path: Path):
    store = CheckpointStore(tmp_path, RUN)
    stage_dir = tmp_path / RUN / "stage-0"
    stage_dir.mkdir(parents=True)
    stale, fresh = stage_dir / ".step-000000001.ckpt.1.a.tmp", stage_dir / ".step-000000002.ckpt.1.b.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - checkpoint.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    store.save(0, snapshot(step=3))
    assert not stale.exists() and fresh.exists()


def test_saving_the_same_state_again_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = CheckpointStore(tmp_path, RUN)
    path = store.save(0, snapshot(step=5, seed=1))

    def refuse(*args: object) -> None:
        raise AssertionError("rewrote an identical checkpoint")

    monkeypatch.setattr(checkpoint, "write_checkpoint", refuse)
    assert store.save(0, snapshot(step=5, seed=1)) == path
    monkeypatch.undo()
    store.save(0, snapshot(step=5, seed=2))  # same step, other state: replaced
    latest = store.latest(0)
    assert latest is not None and latest.digest == snapshot(step=5, seed=2).digest
    blob = path.read_bytes()
    path.write_bytes(_flip(blob, len(blob) - 1))
    store.save(0, snapshot(step=5, seed=2))  # a corrupt file of the same digest is rewritten
    latest = store.latest(0)
    assert latest is not None and latest.digest == snapshot(step=5, seed=2).digest


def test_concurrent_saves_from_threads(tmp_path: Path):
    store = CheckpointStore(tmp_path, RUN, keep=2)
    errors: list[BaseException] = []

    def worker(stage: int) -> None:
        try:
            for s in range(1, 9):
                store.save(stage, snapshot(step=s, seed=stage))
                store.latest(stage)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for stage in (0, 1):
        latest = store.latest(stage)
        assert latest is not None and latest.step == 8
        assert len(list((tmp_path / RUN / f"stage-{stage}").iterdir())) == 2
    assert tmp_files(tmp_path) == []


@pytest.mark.parametrize("run_id", ["", ".", "..", "a/b", "../x", "a\\b", "x" * 300])
def test_store_refuses_unsafe_run_ids(tmp_path: Path, run_id: str):
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, run_id)


def test_store_refuses_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, RUN, keep=0)
    store = CheckpointStore(tmp_path, RUN)
    with pytest.raises(ValueError):
        store.save(-1, snapshot())
    with pytest.raises(CheckpointError):
        store.save(0, StateSnapshot(step=1, entries=[], data=b"", digest="0" * 64))
    assert store.stages() == []


# --- a real stage --------------------------------------------------------------------------------------


def test_stage_state_round_trips_through_a_checkpoint(tmp_path: Path):
    model = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8)
    training = TrainingConfig(num_stages=2, microbatch_size=2, seq_len=8, target_batch_size=2, seed=3)
    m = RunManifest(
        name="ckpt", model=model, optimizer=OptimizerConfig(name="adamw", lr=1e-2), training=training
    )

    def computer() -> StageComputer:
        return StageComputer(build_stage(m, 1), m.optimizer, target_batch_size=2)

    trained = computer()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(2, 8, model.d_model, generator=g)
        assert trained.loss_backward(x, torch.randint(0, model.vocab_size, (2, 8), generator=g)).stepped
    snap = snapshot_state(trained)
    assert any(e.name.startswith("opt.") for e in snap.entries)

    store = CheckpointStore(tmp_path, m.run_id)
    store.save(1, snap)
    back = store.latest(1)
    assert back is not None and back.digest == snap.digest
    fresh = computer()
    load_state(fresh, back)
    assert fresh.step == trained.step == 2
    for (name, a), (_, b) in zip(trained.module.named_parameters(), fresh.module.named_parameters()):
        assert torch.equal(a, b), name
    assert snapshot_state(fresh).digest == snap.digest
