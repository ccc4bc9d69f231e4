"""Atomic writes: the target holds the old file or the whole new one, never part of one; new files get
the permissions the umask gives any new file; a failed write leaves no temp file; the folder is
fsynced after the rename. ``atomic_dir``: a folder appears whole or not at all."""

import os
import stat

import pytest

from loraloom import atomic
from loraloom.atomic import atomic_dir, atomic_file, atomic_new, atomic_write_bytes


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


# --- atomic_new: a new numbered name, never replacing anything ---
def _numbered(folder, suffix=".bin"):
    return lambda n: folder / f"out_{n:05d}_{suffix}"


def test_new_file_takes_the_first_free_number(tmp_path):
    (tmp_path / "out_00001_.bin").write_bytes(b"one")
    with atomic_new(_numbered(tmp_path)) as new:
        assert new.path is None and not new.stage.exists()
        assert new.stage.parent.parent == tmp_path and new.stage.parent.name.startswith("."), \
            "the stage lies in a hidden temp folder beside the targets (same filesystem)"
        new.stage.write_bytes(b"two")
    assert new.path == tmp_path / "out_00002_.bin" and new.path.read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["out_00001_.bin", "out_00002_.bin"], "no temp entry is left"


@pytest.mark.parametrize("folder", [False, True])
def test_a_name_taken_while_writing_is_skipped_never_replaced(tmp_path, folder):
    """The race of two savers, made deterministic: the first free name is taken by someone else after
    it was chosen and before the output is complete."""
    name_for = _numbered(tmp_path, "" if folder else ".bin")
    with atomic_new(name_for, folder=folder) as new:
        if folder:
            new.stage.mkdir()
            (new.stage / "weights").write_bytes(b"mine")
            (tmp_path / "out_00001_").mkdir()  # another saver's reservation: an empty folder
            (tmp_path / "out_00002_").mkdir()  # and another's finished folder
            (tmp_path / "out_00002_" / "weights").write_bytes(b"theirs")
        else:
            new.stage.write_bytes(b"mine")
            (tmp_path / "out_00001_.bin").write_bytes(b"theirs")
    if folder:
        assert new.path == tmp_path / "out_00003_" and (new.path / "weights").read_bytes() == b"mine"
        assert not any((tmp_path / "out_00001_").iterdir()), "an empty folder (a reservation) is not replaced"
        assert (tmp_path / "out_00002_" / "weights").read_bytes() == b"theirs"
    else:
        assert new.path == tmp_path / "out_00002_.bin" and new.path.read_bytes() == b"mine"
        assert (tmp_path / "out_00001_.bin").read_bytes() == b"theirs", "the other writer's file is untouched"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no temp entry is left"


def test_a_dangling_symlink_counts_as_taken(tmp_path):
    (tmp_path / "out_00001_.bin").symlink_to(tmp_path / "nowhere")
    with atomic_new(_numbered(tmp_path)) as new:
        new.stage.write_bytes(b"x")
    assert new.path.name == "out_00002_.bin" and not (tmp_path / "nowhere").exists(), \
        "nothing is written through a symlink"


@pytest.mark.parametrize("folder", [False, True])
@pytest.mark.parametrize("crash", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_new_output_crash_leaves_nothing(tmp_path, folder, crash):
    with pytest.raises(type(crash)):
        with atomic_new(_numbered(tmp_path), folder=folder) as new:
            (new.stage.mkdir() if folder else new.stage.write_bytes(b"half"))
            raise crash
    assert os.listdir(tmp_path) == [] and new.path is None


def test_a_block_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wrote no file"):
        with atomic_new(_numbered(tmp_path)):
            pass
    assert os.listdir(tmp_path) == []


def test_without_hard_links_the_name_is_reserved_then_replaced(tmp_path, monkeypatch):
    """FAT and some network shares refuse link(): the name is then created exclusively and the
    staged file renamed over that reservation; a taken name is still skipped."""
    def no_links(src, dst, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_links)
    (tmp_path / "out_00001_.bin").write_bytes(b"theirs")
    with atomic_new(_numbered(tmp_path)) as new:
        new.stage.write_bytes(b"mine")
        (tmp_path / "out_00002_.bin").write_bytes(b"also theirs")
    assert new.path.name == "out_00003_.bin" and new.path.read_bytes() == b"mine"
    assert (tmp_path / "out_00002_.bin").read_bytes() == b"also theirs"
    assert sorted(os.listdir(tmp_path)) == ["out_00001_.bin", "out_00002_.bin", "out_00003_.bin"]


def test_new_folder_and_its_files_get_the_umask_modes(tmp_path, umask):
    """The folder is staged inside a 0700 temp folder: neither that mode nor mkstemp's 0600 may leak."""
    umask(0o022)
    with atomic_new(_numbered(tmp_path, ""), folder=True) as new:
        with atomic_dir(new.stage) as stage:
            atomic_write_bytes(stage / "sub" / "w.safetensors", b"x")
    assert stat.S_IMODE(new.path.stat().st_mode) == 0o755
    assert stat.S_IMODE((new.path / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((new.path / "sub" / "w.safetensors").stat().st_mode) == 0o644


# --- temp names and stale temps ---
def _kill9_writer(tmp_path, code):
    """Run ``code`` in a child that is killed (SIGKILL) inside its write; returns its pid."""
    import signal
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    return child.pid


KILLED_WRITERS = {
    "file": "from loraloom.atomic import atomic_file\n"
            "with atomic_file({folder!r} + '/a/out.bin') as f:\n"
            "    f.write(b'half'); f.flush(); print('writing', flush=True); import time; time.sleep(60)\n",
    "folder": "from loraloom.atomic import atomic_dir\n"
              "with atomic_dir({folder!r} + '/a/model') as stage:\n"
              "    (stage / 'w').write_bytes(b'half'); print('writing', flush=True); import time; time.sleep(60)\n",
    "new output": "from pathlib import Path\nfrom loraloom.atomic import atomic_new\n"
                  "with atomic_new(lambda n: Path({folder!r}) / 'a' / f'x_{{n:05d}}_.png') as new:\n"
                  "    new.stage.write_bytes(b'half'); print('writing', flush=True); import time; time.sleep(60)\n",
}


@pytest.mark.parametrize("kind", list(KILLED_WRITERS))
def test_temps_of_a_killed_writer_are_removed_and_a_live_ones_kept(tmp_path, kind):
    pid = _kill9_writer(tmp_path, KILLED_WRITERS[kind].format(folder=str(tmp_path)))
    left = os.listdir(tmp_path / "a")
    assert len(left) == 1 and left[0].startswith(".") and left[0].endswith(".tmp") and f"-{pid}." in left[0], \
        f"kill -9 leaves one hidden temp entry naming its pid: {left}"
    (tmp_path / "a" / "keep.bin").write_bytes(b"not a temp")
    (tmp_path / "a" / ".keep.bin.123.tmp").write_bytes(b"not named like ours")
    with atomic_file(tmp_path / "a" / "live.bin") as f:  # this process's own temp, while it is written
        removed = atomic.remove_stale_temps(tmp_path)
        f.write(b"live")
    assert [p.name for p in removed] == left, removed
    assert sorted(os.listdir(tmp_path / "a")) == [".keep.bin.123.tmp", "keep.bin", "live.bin"]


def test_a_runtime_starting_on_an_output_folder_removes_stale_temps(tmp_path):
    from loraloom.api import Runtime

    _kill9_writer(tmp_path, KILLED_WRITERS["new output"].format(folder=str(tmp_path / "out")))
    assert len(os.listdir(tmp_path / "out" / "a")) == 1
    Runtime(output_dir=tmp_path / "out")
    assert os.listdir(tmp_path / "out" / "a") == [], "the killed save's temp folder is gone"


def test_files_and_subfolders_in_a_folder_get_the_umask_modes(tmp_path, umask):
    """A writer that makes its files private (safetensors' save_file: 0600) does not decide the modes
    of a saved folder; symlinks inside are left alone."""
    umask(0o022)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    os.chmod(outside, 0o600)
    with atomic_dir(tmp_path / "model") as stage:
        (stage / "unet").mkdir(mode=0o700)
        fd = os.open(stage / "unet" / "w.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        (stage / "link").symlink_to(outside)
    assert stat.S_IMODE((tmp_path / "model" / "unet").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "model" / "unet" / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600, "a symlink's target is not touched"
