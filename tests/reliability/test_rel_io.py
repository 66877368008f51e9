"""atomic_save / atomic_write: a checkpoint file is always either the old one or the complete new one."""

from __future__ import annotations

import pytest
import torch
from _rel_helpers import raises_documented

from sd_plugin._io import atomic_save, atomic_write, check_checkpoint_file


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_save_round_trip(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    atomic_save(state, tmp_path / "ckpt.pth")
    loaded = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    assert _leftovers(tmp_path) == []


def test_failed_save_keeps_old_checkpoint_and_leaves_no_temp_file(tmp_path):
    dest = tmp_path / "ckpt.pth"
    atomic_save({"version": 1}, dest)

    def crash_half_way(obj, f):
        f.write(b"PK\x03\x04 half a zip archive")
        raise KeyboardInterrupt  # e.g. Ctrl-C while writing

    with pytest.raises(KeyboardInterrupt):
        atomic_save({"version": 2}, dest, save_fn=crash_half_way)
    assert torch.load(dest, weights_only=True) == {"version": 1}
    assert _leftovers(tmp_path) == []


def test_plain_torch_save_would_have_corrupted_it(tmp_path):
    """The failure mode atomic_save prevents: torch.save truncates the destination first."""
    dest = tmp_path / "ckpt.pth"
    torch.save({"version": 1}, dest)

    class Unpicklable:
        def __reduce__(self):
            raise OSError("disk full")

    with pytest.raises(OSError):
        torch.save({"version": 2, "x": Unpicklable()}, dest)
    with pytest.raises(Exception):  # noqa: B017 - any error: the old checkpoint is gone
        torch.load(dest, weights_only=True)
    atomic_save({"version": 1}, dest)
    with pytest.raises(OSError):
        atomic_save({"version": 2, "x": Unpicklable()}, dest)
    assert torch.load(dest, weights_only=True) == {"version": 1}


def test_atomic_write_text(tmp_path):
    with atomic_write(tmp_path / "m.json", "w") as f:
        f.write('{"acc": 0.5}')
    assert (tmp_path / "m.json").read_text() == '{"acc": 0.5}'


@pytest.mark.parametrize(
    "row, make_path, exc, words",
    [
        ("B22", lambda p: p, ValueError, "is a directory"),
        ("B22", lambda p: p / "no" / "such" / "dir" / "x.pth", ValueError, "does not exist"),
        (None, lambda p: 3, TypeError, "must be a str or os.PathLike"),
    ],
)
def test_bad_destination(tmp_path, row, make_path, exc, words):
    with raises_documented(row, exc, match=words) if row else pytest.raises(exc, match=words):
        atomic_save({}, make_path(tmp_path))


def test_bad_mode(tmp_path):
    with pytest.raises(ValueError, match="mode must be"), atomic_write(tmp_path / "x", "a"):
        pass


def test_new_file_gets_the_usual_permissions(tmp_path):
    atomic_save({"a": 1}, tmp_path / "atomic.pth")
    torch.save({"a": 1}, tmp_path / "plain.pth")
    assert (tmp_path / "atomic.pth").stat().st_mode == (tmp_path / "plain.pth").stat().st_mode


def test_check_checkpoint_file_finds_a_truncated_checkpoint(tmp_path):
    atomic_save({"w": torch.zeros(1000)}, tmp_path / "ok.pth")
    check_checkpoint_file(tmp_path / "ok.pth", "--resume")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"--resume .*cut.pth' is truncated"):
        check_checkpoint_file(tmp_path / "cut.pth", "--resume")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        check_checkpoint_file(tmp_path / "empty.pth", "--resume")
    with pytest.raises(ValueError, match="no such checkpoint file"):
        check_checkpoint_file(tmp_path / "missing.pth", "--resume")
    torch.save({"w": 1}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    check_checkpoint_file(tmp_path / "legacy.pth")
