"""The disk cache store on its own (torch-free): entries appear whole, damaged ones are discarded and
never used, the budget evicts the least recently used, a budget of 0 writes nothing, and the folder
is found as documented. A toy JSON codec stands in for the LoRA codec (tested in tests/nodes)."""

import json
import os
import threading
import time
from pathlib import Path

import pytest

from loraloom.graph_runtime import InputError
from loraloom.graph_runtime.cache import file_hasher
from loraloom.graph_runtime.diskcache import (DEFAULT_DISK_CACHE_BYTES, STALE_TMP_S, TMP, DiskCache, default_dir,
                                              entry_key)


class JsonCodec:
    """Outputs that are JSON, in one file; it trusts whatever parses (the store's digest must catch
    a change that still parses)."""

    name = "json-test"
    suffix = ".json"

    def __init__(self, version="1"):
        self._version = version

    def version(self):
        return self._version

    def accepts(self, outputs, ui):
        return all(isinstance(v, (str, int, list)) for v in outputs)

    def save(self, outputs, ui, f, stamp):
        f.write(json.dumps({"outputs": list(outputs), "ui": ui, "stamp": stamp}).encode())

    def load(self, path):
        raw = Path(path).read_bytes()
        data = json.loads(raw)
        h = file_hasher()
        h.update(raw)
        return tuple(data["outputs"]), data["ui"], data["stamp"], h.hexdigest()


KEY_A, KEY_B, KEY_C = ("a" * 64, "b" * 64, "c" * 64)


def entries(store: DiskCache) -> list[Path]:
    return sorted(p for p in store.root.rglob("*.json") if p.parent.name != TMP)


def test_an_entry_round_trips_and_a_second_store_on_the_folder_sees_it(tmp_path):
    codec = JsonCodec()
    store = DiskCache(tmp_path / "cache", 10_000)
    assert store.get(KEY_A, codec) is None
    path = store.put(KEY_A, codec, ("merged", 3), {"text": ["report"]})
    assert path is not None and path.parent.name == KEY_A[:2] and path.name.startswith(KEY_A + ".")
    assert DiskCache(tmp_path / "cache", 10_000).get(KEY_A, codec) == (("merged", 3), {"text": ["report"]})
    assert list((tmp_path / "cache" / TMP).iterdir()) == [], "the temp file became the entry"


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_damaged_entry_is_discarded_with_a_note_and_never_used(tmp_path, damage):
    codec = JsonCodec()
    store = DiskCache(tmp_path, 10_000)
    path = store.put(KEY_A, codec, ("merged-value",), None)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":  # still parses: only the digest in the name can tell
        path.write_bytes(raw.replace(b"merged-value", b"merged-valuf"))
    else:
        path.write_bytes(b"")
    notes = []
    assert store.get(KEY_A, codec, notes.append) is None
    assert not path.exists(), "a damaged entry is deleted"
    assert len(notes) == 1 and path.name in notes[0] and "discarded" in notes[0]
    assert store.put(KEY_A, codec, ("merged-value",), None) is not None
    assert store.get(KEY_A, codec) == (("merged-value",), None), "recomputed and stored again"


def test_an_entry_under_another_keys_name_is_discarded(tmp_path):
    codec = JsonCodec()
    store = DiskCache(tmp_path, 10_000)
    path = store.put(KEY_A, codec, ("a",), None)
    moved = store.root / KEY_B[:2] / path.name.replace(KEY_A, KEY_B)
    moved.parent.mkdir()
    path.rename(moved)
    notes = []
    assert store.get(KEY_B, codec, notes.append) is None
    assert not moved.exists() and "stored under key" in notes[0]


def test_the_least_recently_used_entries_go_first(tmp_path):
    codec = JsonCodec()
    one = len(json.dumps({"outputs": ["x" * 100], "ui": None, "stamp": {"key": KEY_A}}))
    store = DiskCache(tmp_path, 2 * one + 10)  # room for two entries
    a = store.put(KEY_A, codec, ("x" * 100,), None)
    b = store.put(KEY_B, codec, ("y" * 100,), None)
    past = time.time() - 100
    os.utime(a, (past, past))
    os.utime(b, (past + 1, past + 1))
    assert store.get(KEY_A, codec) is not None  # a hit marks A used now: B is the least recent
    store.put(KEY_C, codec, ("z" * 100,), None)
    assert store.get(KEY_B, codec) is None
    assert store.get(KEY_A, codec) is not None and store.get(KEY_C, codec) is not None
    assert store.info().nbytes <= store.max_bytes and store.info().entries == 2


def test_a_result_larger_than_the_budget_is_not_stored(tmp_path):
    notes = []
    store = DiskCache(tmp_path, 50)
    assert store.put(KEY_A, JsonCodec(), ("x" * 100,), None, notes.append) is None
    assert entries(store) == [] and "larger than the disk cache's budget" in notes[0]


def test_budget_zero_reads_and_writes_nothing(tmp_path):
    codec = JsonCodec()
    DiskCache(tmp_path / "cache", 10_000).put(KEY_A, codec, ("a",), None)
    off = DiskCache(tmp_path / "cache", 0)
    assert not off.enabled and off.get(KEY_A, codec) is None
    assert off.put(KEY_B, codec, ("b",), None) is None
    assert [p.name[:64] for p in entries(off)] == [KEY_A]
    fresh = DiskCache(tmp_path / "never", 0)
    fresh.put(KEY_A, codec, ("a",), None)
    assert not (tmp_path / "never").exists()


def test_keys_carry_the_codec_version_and_never_persist_volatile_nodes():
    assert entry_key(KEY_A, JsonCodec("1")) != entry_key(KEY_A, JsonCodec("2"))
    assert entry_key(KEY_A, JsonCodec("1")) == entry_key(KEY_A, JsonCodec("1"))
    assert entry_key("volatile:" + "0" * 32, JsonCodec()) is None
    assert entry_key("unhashable:" + "0" * 32, JsonCodec()) is None


def test_writers_of_one_entry_at_once_leave_one_whole_entry(tmp_path):
    codec = JsonCodec()
    store = DiskCache(tmp_path, 10**6)
    start = threading.Barrier(8)

    def write():
        start.wait()
        DiskCache(tmp_path, 10**6).put(KEY_A, codec, ("same result",) * 50, None)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(entries(store)) == 1
    assert store.get(KEY_A, codec) == (("same result",) * 50, None)
    assert list((tmp_path / TMP).iterdir()) == []


def test_a_failing_write_is_a_note_not_an_error(tmp_path):
    class Broken(JsonCodec):
        def save(self, outputs, ui, f, stamp):
            raise OSError(28, "No space left on device")

    notes = []
    store = DiskCache(tmp_path, 10_000)
    assert store.put(KEY_A, Broken(), ("a",), None, notes.append) is None
    assert "No space left on device" in notes[0]
    assert entries(store) == [] and list((tmp_path / TMP).iterdir()) == []


def test_clear_deletes_entries_and_stale_temps_only_and_info_counts(tmp_path):
    codec = JsonCodec()
    store = DiskCache(tmp_path, 10_000)
    store.put(KEY_A, codec, ("a",), None)
    store.put(KEY_B, codec, ("b",), None)
    (tmp_path / "notes.txt").write_text("mine")
    info = store.info()
    assert info.entries == 2 and info.nbytes == sum(p.stat().st_size for p in entries(store))
    gone = store.clear()
    assert gone.entries == 2 and store.info().entries == 0
    assert (tmp_path / "notes.txt").read_text() == "mine", "a file the store did not write stays"


def test_a_killed_writers_temp_is_removed_once_stale(tmp_path):
    store = DiskCache(tmp_path, 10_000)
    (tmp_path / TMP).mkdir()
    old, new = tmp_path / TMP / "old.json", tmp_path / TMP / "new.json"
    old.write_text("half")
    new.write_text("being written")
    past = time.time() - STALE_TMP_S - 10
    os.utime(old, (past, past))
    store.evict()
    assert not old.exists() and new.exists()


def test_the_folder_and_budget_are_configured_as_documented(tmp_path):
    home = Path.home()
    assert default_dir({}) == home / ".cache" / "loraloom" / "results"
    assert default_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "loraloom" / "results"
    env = {"XDG_CACHE_HOME": "/elsewhere", "LORALOOM_DISK_CACHE_DIR": str(tmp_path / "d")}
    assert default_dir(env) == tmp_path / "d"
    assert DiskCache.configure(env={}).max_bytes == DEFAULT_DISK_CACHE_BYTES
    assert DiskCache.configure(env={"LORALOOM_DISK_CACHE_BYTES": "1_000"}).max_bytes == 1000
    assert DiskCache.configure(tmp_path / "arg", 5, env=env).root == tmp_path / "arg"
    assert DiskCache.configure(tmp_path / "arg", 5, env=env).max_bytes == 5
    with pytest.raises(InputError, match="LORALOOM_DISK_CACHE_BYTES") as err:
        DiskCache.configure(env={"LORALOOM_DISK_CACHE_BYTES": "lots"})
    assert err.value.kind == "bad_cache_budget"
    with pytest.raises(InputError):
        DiskCache(tmp_path, -1)


def test_a_cache_folder_that_is_a_file_is_a_miss_and_a_note(tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    store = DiskCache(tmp_path / "cache", 10_000)
    notes = []
    assert store.get(KEY_A, JsonCodec(), notes.append) is None and notes == []
    assert store.put(KEY_A, JsonCodec(), ("a",), None, notes.append) is None
    assert len(notes) == 1 and "could not be stored" in notes[0]
    assert store.info().entries == 0
