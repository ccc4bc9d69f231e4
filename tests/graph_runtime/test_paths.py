"""The one helper that resolves a name under a root, and folder configuration."""

import os

import pytest

from loraloom.graph_runtime import Folders, PathError, resolve_under


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "loras"
    (r / "sub").mkdir(parents=True)
    (r / "a.safetensors").write_bytes(b"x")
    (r / "sub" / "b.safetensors").write_bytes(b"y")
    (tmp_path / "secret.txt").write_text("no")
    return r


@pytest.mark.parametrize("name,fragment", [
    ("../secret.txt", "contains a '..' part"),
    ("sub/../../secret.txt", "contains a '..' part"),
    ("/etc/passwd", "is an absolute path"),
    ("C:/Windows/x", "is an absolute path"),
    ("sub\\b.safetensors", "backslash"),
    ("a\x00.safetensors", "NUL byte"),
    ("", "non-empty string"),
])
def test_escapes_refused(root, name, fragment):
    with pytest.raises(PathError) as info:
        resolve_under(root, name, what="LoRA")
    assert fragment in str(info.value), str(info.value)


def test_symlink_out_of_root_refused(root, tmp_path):
    os.symlink(tmp_path / "secret.txt", root / "link.safetensors")
    with pytest.raises(PathError, match="outside the folder"):
        resolve_under(root, "link.safetensors")
    os.symlink(tmp_path, root / "up")
    with pytest.raises(PathError, match="outside the folder"):
        resolve_under(root, "up/secret.txt")


def test_resolves_inside_and_lists(root):
    assert resolve_under(root, "sub/b.safetensors") == (root / "sub" / "b.safetensors").resolve()
    folders = Folders.configure(lora_dirs=[root], env={})
    assert folders.list("loras", (".safetensors",)) == ["a.safetensors", "sub/b.safetensors"]
    with pytest.raises(PathError, match=r"'missing.safetensors' not found in .*loras"):
        folders.find("loras", "missing.safetensors")


def test_configuration_precedence(tmp_path):
    env = {"LORALOOM_LORA_DIRS": f"{tmp_path}/e1{os.pathsep}{tmp_path}/e2",
           "LORALOOM_MODELS_DIR": f"{tmp_path}/m", "LORALOOM_OUTPUT_DIR": f"{tmp_path}/o"}
    from_env = Folders.configure(env=env)
    assert from_env.lora_dirs == [tmp_path / "e1", tmp_path / "e2"]
    assert (from_env.models_dir, from_env.output_dir) == (tmp_path / "m", tmp_path / "o")
    args = Folders.configure(lora_dirs=[tmp_path / "a"], output_dir=tmp_path / "x", env=env)
    assert args.lora_dirs == [tmp_path / "a"] and args.output_dir == tmp_path / "x"
    assert args.models_dir == tmp_path / "m", "unset arguments fall back to the environment"
    default = Folders.configure(env={})
    assert default.lora_dirs == [default.models_dir / "loras"]
