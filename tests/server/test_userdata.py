"""The editor's settings and files in the user folder, on the UserData object itself (the HTTP routes
over it are in test_security.py): JSON only, written whole, never outside ``<user>/default``."""

import json
import logging
import os
import threading

import pytest

from loraloom.graph_runtime import PathError, WorkflowError
from loraloom.server.userdata import DEFAULTS, Conflict, UserData


@pytest.fixture
def userdata(tmp_path):
    return UserData(tmp_path / "user")


def test_the_folders_the_editor_expects_exist(tmp_path):
    data = UserData(tmp_path / "user")
    assert data.root == tmp_path / "user" / "default"
    assert (data.root / "workflows").is_dir() and (data.root / "subgraphs").is_dir()
    assert data.listing("workflows", recurse=True, full_info=False, split=False) == []


def test_settings_merge_and_survive_a_new_instance(userdata, tmp_path):
    assert userdata.settings() == {}
    userdata.update_settings({"Comfy.A": 1, "Comfy.B": [1, 2]})
    userdata.update_settings({"Comfy.A": 2})
    assert UserData(tmp_path / "user").settings() == {"Comfy.A": 2, "Comfy.B": [1, 2]}


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"a": 1, "a": 2}', b'{"a": NaN}'])
def test_a_broken_settings_file_reads_as_empty_and_is_reported(userdata, caplog, content):
    path = userdata.root / "comfy.settings.json"
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="loraloom.server"):
        assert userdata.settings() == {}
    assert any("settings file unreadable" in r.getMessage() for r in caplog.records), "the user is told"
    assert path.read_bytes() == content, "reading never rewrites the file"


def test_settings_updates_from_many_threads_all_land(userdata):
    threads = [threading.Thread(target=userdata.update_settings, args=({f"key.{i}": i},)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert userdata.settings() == {f"key.{i}": i for i in range(16)}, "no update may be lost"


def test_write_read_and_overwrite(userdata):
    path = userdata.write("workflows/deep/a.json", b'{"nodes": []}', overwrite=False)
    assert path == userdata.root / "workflows" / "deep" / "a.json", "subfolders are created"
    assert userdata.read("workflows/deep/a.json") == (b'{"nodes": []}', "application/json")
    with pytest.raises(Conflict, match="workflows/deep/a.json.*overwrite=true"):
        userdata.write("workflows/deep/a.json", b"{}", overwrite=False)
    assert isinstance(Conflict("x"), PathError), "the routes answer a conflict like any refused path"
    assert path.read_bytes() == b'{"nodes": []}', "a refused write leaves the file"
    userdata.write("workflows/deep/a.json", b"[]", overwrite=True)
    assert path.read_bytes() == b"[]"
    assert userdata.info(path)["path"] == "workflows/deep/a.json" and userdata.info(path)["size"] == 2


@pytest.mark.parametrize("data", [b"not json", b'{"a": 1, "a": 2}', b'{"a": Infinity}', b"[" * 200 + b"]" * 200])
def test_only_valid_json_is_written(userdata, data):
    with pytest.raises(WorkflowError):
        userdata.write("workflows/x.json", data, overwrite=True)
    assert not (userdata.root / "workflows" / "x.json").exists()


@pytest.mark.parametrize("name, writing, allowed", [
    ("user.css", False, True), ("user.css", True, False), ("workflows/a.JSON", True, True),
    ("script.js", False, False), ("evil.py", True, False), ("notes.txt", False, False),
])
def test_file_kinds(userdata, name, writing, allowed):
    if allowed:
        assert userdata.path(name, writing=writing).name == name.rsplit("/", 1)[-1]
    else:
        with pytest.raises(PathError, match=f"{name!r}: only .json"):
            userdata.path(name, writing=writing)


@pytest.mark.parametrize("name", ["../escape.json", "/etc/passwd.json", "a\\b.json", "a\x00.json",
                                  "workflows/../../escape.json"])
def test_names_outside_the_folder_are_refused(userdata, name):
    with pytest.raises(PathError):
        userdata.path(name, writing=True)


def test_the_files_the_page_always_asks_for_have_defaults(userdata):
    for name, default in DEFAULTS.items():
        found = userdata.read(name)
        assert found is not None and found[0] == default, f"{name}: a missing file reads as its default"
    (userdata.root / "user.css").write_text("body {}")
    assert userdata.read("user.css") == (b"body {}", "text/css"), "an existing file wins over the default"
    assert userdata.read("workflows/missing.json") is None


def test_delete_and_move(userdata):
    userdata.write("workflows/a.json", b"{}", overwrite=False)
    userdata.write("workflows/b.json", b"[]", overwrite=False)
    with pytest.raises(Conflict):
        userdata.move("workflows/a.json", "workflows/b.json", overwrite=False)
    assert userdata.read("workflows/a.json")[0] == b"{}" and userdata.read("workflows/b.json")[0] == b"[]"
    moved = userdata.move("workflows/a.json", "subgraphs/new/c.json", overwrite=False)
    assert moved == userdata.root / "subgraphs" / "new" / "c.json" and moved.read_bytes() == b"{}"
    assert userdata.read("workflows/a.json") is None
    assert userdata.move("workflows/a.json", "workflows/d.json", overwrite=False) is None, "nothing to move"
    with pytest.raises(PathError, match="only .json"):
        userdata.move("workflows/b.json", "workflows/b.py", overwrite=True)
    assert userdata.delete("workflows/b.json") is True
    assert userdata.delete("workflows/b.json") is False, "deleting a missing file says so"


def test_listing_forms(userdata):
    for name in ("workflows/a.json", "workflows/sub/b.json"):
        userdata.write(name, b"{}", overwrite=False)
    assert userdata.listing("workflows", recurse=True, full_info=False, split=False) == ["a.json", "sub/b.json"]
    assert userdata.listing("workflows/", recurse=False, full_info=False, split=False) == ["a.json"]
    assert userdata.listing("workflows", recurse=True, full_info=False, split=True) == \
        [["a.json", "a.json"], ["sub/b.json", "sub", "b.json"]]
    full = userdata.listing("workflows", recurse=True, full_info=True, split=False)
    assert [set(f) for f in full] == [{"path", "size", "modified", "created"}] * 2 and full[0]["size"] == 2
    everything = userdata.listing("", recurse=True, full_info=False, split=False)
    assert everything == ["workflows/a.json", "workflows/sub/b.json"]
    assert userdata.listing("missing", recurse=True, full_info=False, split=False) is None
    with pytest.raises(PathError):
        userdata.listing("../..", recurse=True, full_info=False, split=False)


def test_listing_skips_symlinks(userdata, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"secret": 1}))
    os.symlink(secret, userdata.root / "workflows" / "link.json")
    userdata.write("workflows/real.json", b"{}", overwrite=False)
    assert userdata.listing("workflows", recurse=True, full_info=False, split=False) == ["real.json"]


@pytest.mark.parametrize("name", ["x" * 251 + ".json", "workflows/" + "é" * 130 + ".json",
                                  "/".join(["d" * 200] * 25) + ".json"])
def test_names_too_long_for_the_file_system_are_refused(userdata, name):
    with pytest.raises(PathError) as refused:
        userdata.write(name, b"{}", overwrite=True)
    assert refused.value.kind == "name_too_long" and refused.value.fix
    with pytest.raises(PathError):
        userdata.read(name)


def test_a_folder_is_never_written_or_moved_onto(userdata):
    (userdata.root / "workflows" / "dir.json").mkdir()
    userdata.write("workflows/a.json", b"{}", overwrite=True)
    with pytest.raises(PathError) as refused:
        userdata.write("workflows/dir.json", b"{}", overwrite=True)
    assert refused.value.kind == "is_folder"
    with pytest.raises(PathError):
        userdata.move("workflows/a.json", "workflows/dir.json", overwrite=True)
    assert (userdata.root / "workflows" / "a.json").is_file() and (userdata.root / "workflows" / "dir.json").is_dir()
