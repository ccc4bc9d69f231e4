"""atomic_dir: a folder appears whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from loraloom.atomic import atomic_dir


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
