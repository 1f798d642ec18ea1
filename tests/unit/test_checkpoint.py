import os

import pytest

from hvdtrain.errors import WriteError

from hvdtrain.train import checkpoint


def test_round_trip_keeps_payload_and_metadata(tmp_path):
    path = checkpoint.save(tmp_path, 3, b"weights" * 100, {"spec": {"name": "x"}}, keep_last=5)
    loaded = checkpoint.load(path)
    assert loaded.epoch == 3 and loaded.payload == b"weights" * 100
    assert loaded.meta == {"spec": {"name": "x"}}


def test_keep_last_prunes_oldest(tmp_path):
    for epoch in range(1, 6):
        checkpoint.save(tmp_path, epoch, bytes([epoch]), {}, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["epoch-000004.ckpt", "epoch-000005.ckpt"]


def test_truncated_and_altered_files_are_detected_and_skipped(tmp_path):
    for epoch in (1, 2, 3):
        checkpoint.save(tmp_path, epoch, os.urandom(4096), {}, keep_last=10)
    newest = checkpoint.checkpoint_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:-100])
    middle = checkpoint.checkpoint_path(tmp_path, 2)
    data = bytearray(middle.read_bytes())
    data[-10] ^= 0xFF
    middle.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(newest)
    with pytest.raises(checkpoint.CheckpointError, match="integrity hash mismatch"):
        checkpoint.load(middle)
    warnings = []
    found = checkpoint.latest_valid(tmp_path, warn=warnings.append)
    assert found.epoch == 1
    assert len(warnings) == 2 and "epoch-000003" in warnings[0] and "epoch-000002" in warnings[1]


def test_garbage_file_is_not_a_checkpoint(tmp_path):
    checkpoint.checkpoint_path(tmp_path, 1).write_bytes(b"not a checkpoint")
    assert checkpoint.latest_valid(tmp_path, warn=lambda m: None) is None
    assert checkpoint.latest_valid(tmp_path / "missing") is None


def test_failed_write_leaves_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, b"good", {}, keep_last=3)

    def crash(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(WriteError, match=f"could not write checkpoint {tmp_path / 'epoch-000002.ckpt'}: No space "
                                         f"left .* the last good checkpoint is {tmp_path / 'epoch-000001.ckpt'}"):
        checkpoint.save(tmp_path, 2, b"never seen", {}, keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000001.ckpt"]
    assert checkpoint.latest_valid(tmp_path).payload == b"good"
