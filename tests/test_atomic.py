"""Atomic writes: the target holds the old file or the whole new one, never part of one; new files get
the permissions the umask gives any new file; a failed write leaves no temp file; the folder is
fsynced after the rename. ``atomic_dir``: a folder appears whole or not at all."""

import os
import stat

import pytest

from loraloom import atomic
from loraloom.atomic import atomic_dir, atomic_file, atomic_write_bytes


@pytest.fixture
def umask():
    """``umask(value)`` sets the process umask for this test; the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def test_writes_the_whole_file_and_creates_missing_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    assert atomic_write_bytes(target, b"\x00payload\xff") == target
    assert target.read_bytes() == b"\x00payload\xff"
    assert os.listdir(target.parent) == ["out.bin"], "only the target is left in its folder"


def test_the_target_appears_only_when_the_block_ends(tmp_path):
    target = tmp_path / "out.json"
    target.write_bytes(b"old")
    with atomic_file(target) as f:
        f.write(b"new, half")
        f.flush()
        assert target.read_bytes() == b"old", "while writing, readers still see the old file"
        temps = [p for p in os.listdir(tmp_path) if p != "out.json"]
        assert len(temps) == 1 and temps[0].startswith(".out.json.") and temps[0].endswith(".tmp"), \
            f"the data goes to one hidden temp file beside the target (same filesystem: rename is atomic): {temps}"
        f.write(b" and the rest")
    assert target.read_bytes() == b"new, half and the rest"
    assert os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize("error", [ValueError("bad data"), KeyboardInterrupt()])
def test_an_error_while_writing_keeps_the_old_file_and_removes_the_temp_file(tmp_path, error):
    target = tmp_path / "out.json"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_file(target) as f:
            f.write(b"partial")
            raise error
    assert target.read_bytes() == b"old", "a failed write leaves the old file"
    assert os.listdir(tmp_path) == ["out.json"], "no temp file left behind"
    fresh = tmp_path / "never.json"
    with pytest.raises(ValueError):
        with atomic_file(fresh) as f:
            raise ValueError("before any data")
    assert not fresh.exists() and os.listdir(tmp_path) == ["out.json"], "a new file that failed does not appear"


def test_a_failing_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_bytes(b"old")

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640), (0o002, 0o664)])
def test_new_files_get_the_mode_the_umask_gives(tmp_path, umask, mask, mode):
    umask(mask)
    target = atomic_write_bytes(tmp_path / "out.json", b"{}")
    assert stat.S_IMODE(target.stat().st_mode) == mode, \
        f"umask {mask:03o}: {stat.S_IMODE(target.stat().st_mode):03o}, like open() would give {mode:03o}"
    plain = tmp_path / "plain.json"
    plain.write_bytes(b"{}")
    assert stat.S_IMODE(plain.stat().st_mode) == mode, "the same mode as a file written the ordinary way"
    assert os.umask(mask) == mask, "reading the umask must leave it as it was"


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), os.fstat(fd).st_ino, target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", record)
    atomic_write_bytes(target, b"{}")
    assert [(is_dir, existed) for is_dir, _, existed in synced] == [(False, False), (True, True)], \
        "the temp file's data is synced before the rename, the folder's entry after it"
    assert synced[1][1] == tmp_path.stat().st_ino, "the folder fsynced is the target's own"


def test_a_folder_that_cannot_be_fsynced_still_gets_the_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    real_fsync = os.fsync

    def files_only(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError("Invalid argument")  # what some filesystems answer for a folder
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", files_only)
    atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one"

    real_open = os.open

    def no_folder_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError("folder not readable")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", no_folder_open)
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two", "a folder that cannot be opened for fsync does not fail the write"


# --- atomic_dir ---
def test_folder_appears_with_its_files(tmp_path):
    target = tmp_path / "out" / "model"
    with atomic_dir(target) as stage:
        assert not target.exists(), "the target must not appear before the block ends"
        (stage / "sub").mkdir()
        (stage / "sub" / "weights.bin").write_bytes(b"abc")
        (stage / "config.json").write_text("{}")
    assert (target / "sub" / "weights.bin").read_bytes() == b"abc"
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"], "no temp folder may be left"


@pytest.mark.parametrize("crash", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_mid_write_leaves_no_target_and_no_temp(tmp_path, crash):
    target = tmp_path / "model"
    with pytest.raises(type(crash)):
        with atomic_dir(target) as stage:
            (stage / "half.bin").write_bytes(b"x" * 100)
            raise crash
    assert list(tmp_path.iterdir()) == [], "a crash must leave neither the target nor the stage folder"


def test_existing_empty_folder_is_replaced(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    with atomic_dir(target) as stage:
        (stage / "a").write_text("1")
    assert (target / "a").read_text() == "1"


@pytest.mark.parametrize("existing", ["file", "full folder"])
def test_refuses_an_existing_target(tmp_path, existing):
    target = tmp_path / "model"
    if existing == "file":
        target.write_text("keep me")
    else:
        target.mkdir()
        (target / "keep").write_text("keep me")
    with pytest.raises(FileExistsError, match="Fix:"):
        with atomic_dir(target):
            pytest.fail("the block must not run when the target is taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "nothing else may be left behind"


def test_folder_gets_the_mode_a_new_folder_would_get(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model"):
            pass
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755, "mkdtemp's 0700 must not leak out"
