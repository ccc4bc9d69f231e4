"""A file name that is not found names every folder searched, and marks the ones that do not exist:
a mistyped --lora-dir is the answer, so the error must show it."""

import json

import pytest

from loraloom.cli import main
from loraloom.graph_runtime import Folders, PathError


def test_cli_names_a_lora_dir_that_does_not_exist(tmp_path, capsys):
    real = tmp_path / "loras"
    real.mkdir()
    (real / "a.safetensors").write_bytes(b"")
    typo = tmp_path / "lroas"
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": "b.safetensors"}},
                              "2": {"class_type": "SaveLoRA", "inputs": {"lora": ["1", 0]}}}))
    assert main(["validate", str(wf), "--lora-dir", str(real), "--lora-dir", str(typo)]) == 1
    err = capsys.readouterr().err
    assert ("node 1 (LoadLoRA) input 'lora_name': 'b.safetensors' is not one of ['a.safetensors']; "
            f"searched {real}, {typo} (does not exist). Fix: ") in err, err


def test_find_marks_roots_that_are_missing_or_not_folders(tmp_path):
    file_root = tmp_path / "file"
    file_root.write_text("")
    folders = Folders.configure(lora_dirs=[tmp_path / "none", file_root, tmp_path], env={})
    with pytest.raises(PathError) as info:
        folders.find("loras", "x.safetensors")
    assert info.value.kind == "not_found"
    assert (f"lora 'x.safetensors' not found in {tmp_path / 'none'} (does not exist), {file_root} "
            f"(not a folder), {tmp_path}.") in str(info.value), str(info.value)
