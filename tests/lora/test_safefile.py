"""The strict LoRA file reader against hostile files built by hand, byte by byte.

Each refusal test asserts that our own message names the file, the key, the offending value and
the limit (whichever of them apply), so a user can act on the error without a debugger.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
import time
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from loraloom.graph_runtime import file_fingerprint
from loraloom.lora.safefile import (
    DEFAULT_LIMITS,
    SUPPORTED_DTYPES,
    Limits,
    LoRAFileError,
    inspect_header,
    read_lora_file,
)

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------------- helpers


def write_st(path: Path, header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file from a header (dict or raw bytes) and a data section, no checks."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype: str = "F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def refused(path: Path, **kwargs) -> LoRAFileError:
    with pytest.raises(LoRAFileError) as info:
        read_lora_file(path, **kwargs)
    return info.value


def assert_names(err: LoRAFileError, path: Path, *, key=None, value=None, limit=None, says=()) -> None:
    """The message names the file, and the key, value and limit where given, plus phrases."""
    msg = str(err)
    assert err.path == path, f"err.path {err.path} is not {path}"
    assert str(path) in msg, f"message does not name the file: {msg}"
    if key is not None:
        assert err.key == key, f"err.key {err.key!r} is not {key!r}: {msg}"
        assert repr(key) in msg, f"message does not name key {key!r}: {msg}"
    if value is not None:
        assert err.value == value, f"err.value {err.value!r} is not {value!r}: {msg}"
        assert str(value) in msg, f"message does not name value {value!r}: {msg}"
    if limit is not None:
        assert err.limit == limit, f"err.limit {err.limit!r} is not {limit!r}: {msg}"
        assert str(limit) in msg, f"message does not name limit {limit!r}: {msg}"
    for phrase in says:
        assert phrase in msg, f"message lacks {phrase!r}: {msg}"


# ------------------------------------------------------------------------------- valid files


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for code, dtype in SUPPORTED_DTYPES.items():
        if dtype.is_floating_point or dtype.is_complex:
            t = torch.randn(3, 4, generator=gen, dtype=torch.float32).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, (3, 4), generator=gen).bool()
        else:
            t = torch.randint(0, 100, (3, 4), generator=gen).to(dtype)
        tensors[f"lora_unet.{code}.weight"] = t
    tensors["scalar.alpha"] = torch.tensor(8.0)
    tensors["empty"] = torch.zeros(0, 5, dtype=torch.float16)
    return tensors


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Compare bytes: equal() lacks float8 kernels, and bit-identity is the claim anyway.
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def test_round_trip_matches_safetensors_for_every_dtype(tmp_path):
    tensors = all_dtype_tensors()
    metadata = {"ss_network_alpha": "8", "format": "pt", "ünïcode": "✓ {\"nested\": [1, 2]}"}
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file(tensors, path, metadata=metadata)

    got = read_lora_file(path)
    reference = safetensors.torch.load_file(path)

    assert list(got.tensors) == sorted(tensors), "tensors come back sorted by key"
    for key, tensor in tensors.items():
        assert same_tensor(got.tensors[key], tensor), f"{key} differs from what was saved"
        assert same_tensor(got.tensors[key], reference[key]), f"{key} differs from safetensors' load_file"
    assert got.metadata == metadata
    assert got.size == path.stat().st_size
    assert got.format == "safetensors"
    assert got.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert got.fingerprint == file_fingerprint(path), "must agree with the graph runtime's file fingerprint"


def test_inspect_header_lists_keys_without_reading_data(tmp_path):
    tensors = all_dtype_tensors()
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"a": "b"})
    header = inspect_header(path)
    assert sorted(header.tensors) == sorted(tensors)
    assert header.metadata == {"a": "b"}
    for key, info in header.tensors.items():
        assert info.torch_dtype == tensors[key].dtype, key
        assert info.shape == tuple(tensors[key].shape), key
        assert info.nbytes == tensors[key].numel() * tensors[key].element_size(), key
    # No data is read: NaN in the data passes inspect_header and fails read_lora_file.
    nan_path = write_st(tmp_path / "nan.safetensors", {"w": entry("F32", (2,), (0, 8))}, f32(NAN, 1))
    assert inspect_header(nan_path).tensors["w"].shape == (2,)
    with pytest.raises(LoRAFileError, match="NaN"):
        read_lora_file(nan_path)
    # Yet offsets are checked against the file size: cut all the data.
    path.write_bytes(path.read_bytes()[: header.data_start])
    with pytest.raises(LoRAFileError, match="truncated"):
        inspect_header(path)


def test_tensors_own_their_storage(tmp_path):
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"a": torch.ones(4), "b": torch.ones(4)}, path)
    got = read_lora_file(path).tensors
    got["a"].zero_()
    assert torch.equal(got["b"], torch.ones(4)), "tensors must not overlap"
    # One buffer for the data section, owned by the reader: no bytes beyond the file's tensors.
    assert got["b"].untyped_storage().nbytes() == 32
    assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()
    path.write_bytes(b"\0" * path.stat().st_size)
    assert torch.equal(got["b"], torch.ones(4)), "what was read is a copy, not a view of the file"


@pytest.mark.parametrize("position", [0, 31, 32, 99, 100, 131, 299])
def test_non_finite_in_a_run_of_tensors_names_its_tensor(tmp_path, monkeypatch, position):
    # Neighbours of one dtype are read and checked a slice at a time, across tensor boundaries;
    # the refusal still names the tensor and counts its own bad values.
    from loraloom.lora import safefile

    monkeypatch.setattr(safefile, "HASH_CHUNK_BYTES", 64)  # 32 bf16 values per slice
    values = {name: torch.ones(100, dtype=torch.bfloat16) for name in ("a", "b", "c")}
    key = "abc"[position // 100]
    values[key][position % 100] = float("nan")
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({**values, "alpha": torch.tensor(4.0)}, path)
    assert_names(refused(path), path, key=key, value=1, limit=0, says=["1 NaN", "out of 100", "BF16"])
    values[key][position % 100] = 1.0
    safetensors.torch.save_file({**values, "alpha": torch.tensor(4.0)}, path)
    got = read_lora_file(path).tensors
    assert all(torch.equal(got[k], values[k]) for k in values) and got["alpha"].item() == 4.0


def test_safetensors_content_loads_whatever_the_name(tmp_path):
    path = tmp_path / "renamed.pt"
    safetensors.torch.save_file({"a": torch.arange(3.0)}, path)
    assert torch.equal(read_lora_file(path).tensors["a"], torch.arange(3.0))


def test_hand_written_file_without_alignment_padding(tmp_path):
    # An F32 tensor at data offset 2: not aligned, which other writers produce.
    header = {"b": entry("F32", (2,), (2, 10)), "a": entry("U8", (2,), (0, 2)), "__metadata__": {"k": "v"}}
    path = write_st(tmp_path / "odd.safetensors", header, b"\x01\x02" + f32(1.5, -2.0))
    got = read_lora_file(path)
    assert torch.equal(got.tensors["b"], torch.tensor([1.5, -2.0])), "misaligned data must still read right"
    assert got.tensors["a"].tolist() == [1, 2]


# --------------------------------------------------------------------- what the file really is


def html_page() -> bytes:
    return b"\xef\xbb\xbf\n  <!DOCTYPE html><html><head><title>Sign in - Civitai</title></head><body></body></html>"


@pytest.mark.parametrize(
    "content, says",
    [
        (html_page(), ["HTML web page", "'Sign in - Civitai'", "Fix: download the file again"]),
        (b"<html><body>502 Bad Gateway</body></html>", ["HTML web page"]),
        (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code></Error>',
            ["XML", "AccessDenied"],
        ),
        (b'{"error": "Unauthorized", "detail": "token required"}', ["JSON text document", "Unauthorized"]),
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 228454632\n",
            ["Git LFS pointer", "228454632-byte", "sha256:abab", "git lfs pull"],
        ),
        (gzip.compress(b"x" * 100), ["gzip", "Fix: decompress"]),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 16, ["GGUF"]),
    ],
    ids=["html", "html-no-doctype", "xml", "json", "lfs", "gzip", "gguf"],
)
def test_not_safetensors_says_what_it_is(tmp_path, content, says):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(content)
    assert_names(refused(path), path, says=says)
    with pytest.raises(LoRAFileError):
        inspect_header(path)


def test_zip_archive_says_unzip(tmp_path):
    path = tmp_path / "lora.safetensors"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("my_lora.safetensors", b"whatever")
    assert_names(refused(path), path, says=["ZIP archive", "my_lora.safetensors", "unzip"])


def save_torch(path: Path, obj, legacy: bool) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".safetensors"])
def test_pickle_refused_by_default(tmp_path, suffix, legacy):
    path = save_torch(tmp_path / f"lora{suffix}", {"a": torch.ones(2)}, legacy)
    err = refused(path)
    assert_names(
        err,
        path,
        says=[
            "pickle",
            "can run any code",
            "weights_only=True",
            "safetensors.torch",
            "save_file",
            str(path.with_suffix(".safetensors")),
            "allow_pickle=True",
        ],
    )
    assert ("ZIP" in str(err)) != legacy, "a zip checkpoint is named as torch.save's ZIP, a legacy one as a pickle"
    if suffix == ".safetensors":
        assert "despite its .safetensors suffix" in str(err)
    with pytest.raises(LoRAFileError, match="pickle"):
        inspect_header(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_allow_pickle_loads_with_weights_only(tmp_path, legacy):
    tensors = {"b.alpha": torch.tensor(4.0), "a.lora_down.weight": torch.randn(4, 8, dtype=torch.bfloat16)}
    path = save_torch(tmp_path / "lora.ckpt", tensors, legacy)
    got = read_lora_file(path, allow_pickle=True)
    assert got.format == "pickle"
    assert list(got.tensors) == sorted(tensors)
    for key, tensor in tensors.items():
        assert same_tensor(got.tensors[key], tensor), key
    assert got.metadata == {}
    assert got.fingerprint == file_fingerprint(path)


def test_allow_pickle_returns_plain_tensors(tmp_path):
    path = save_torch(tmp_path / "lora.pt", {"a": torch.nn.Parameter(torch.ones(2))}, legacy=False)
    got = read_lora_file(path, allow_pickle=True).tensors["a"]
    assert type(got) is torch.Tensor and not got.requires_grad, "a Parameter must not leak autograd"


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        # Unpickling calls open(marker, "w"): harmless, and it leaves evidence if it ever runs.
        return (open, (str(self.marker), "w"))


def test_allow_pickle_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = save_torch(tmp_path / "evil.pt", {"a": torch.ones(2), "b": _RunsCode(marker)}, legacy=False)
    err = refused(path, allow_pickle=True)
    assert_names(err, path, says=["weights_only=True", "refused"])
    assert not marker.exists(), "unpickling ran code from the file"


@pytest.mark.parametrize(
    "obj, key, says",
    [
        ({"a": torch.ones(2), "epoch": 3}, "epoch", ["int", "not a tensor"]),
        ({"state_dict": {"a": torch.ones(2)}}, "state_dict", ["dict", "not a tensor", "nested"]),
        ({"a": torch.tensor([1.0, NAN])}, "a", ["1 non-finite", "1 NaN"]),
        ({"a": torch.ones(2, 2).to_sparse()}, "a", ["sparse"]),
        ({"a": torch.empty(2, device="meta")}, "a", ["on meta", "dense CPU"]),
    ],
    ids=["int", "nested", "nan", "sparse", "meta"],
)
def test_allow_pickle_checks_contents(tmp_path, obj, key, says):
    path = save_torch(tmp_path / "lora.pt", obj, legacy=False)
    assert_names(refused(path, allow_pickle=True), path, key=key, says=says)


def test_pickle_of_a_list_refused(tmp_path):
    path = save_torch(tmp_path / "lora.pt", [torch.ones(2)], legacy=False)
    assert_names(refused(path, allow_pickle=True), path, value="list", says=["not a dict of tensors"])


@pytest.mark.parametrize("size", [0, 1, 7])
def test_shorter_than_length_prefix(tmp_path, size):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"\x05" * size)
    assert_names(refused(path), path, value=size, limit=8, says=["8 bytes" if size == 0 else "8-byte"])


def test_directory_refused(tmp_path):
    path = tmp_path / "dir.safetensors"
    path.mkdir()
    assert_names(refused(path), path, says=["directory"])


def test_file_above_size_limit(tmp_path):
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"a": torch.ones(64)}, path)
    size = path.stat().st_size
    err = refused(path, limits=Limits(max_file_bytes=100))
    assert_names(err, path, value=size, limit=100, says=["max_file_bytes"])


# ---------------------------------------------------------------------------------- the header


def test_header_length_beyond_file(tmp_path):
    path = write_st(tmp_path / "lora.safetensors", b'{"a": 1}', length=5000)
    assert_names(refused(path), path, value=5000, limit=8, says=["truncated or not a safetensors file"])


def test_header_length_above_limit(tmp_path):
    header = {"a": entry("F32", (2,), (0, 8)), "__metadata__": {"pad": "x" * 200}}
    path = write_st(tmp_path / "lora.safetensors", header, f32(1, 2))
    length = len(json.dumps(header).encode())
    err = refused(path, limits=Limits(max_header_bytes=128))
    assert_names(err, path, value=length, limit=128, says=["max_header_bytes"])


def test_header_length_zero(tmp_path):
    path = write_st(tmp_path / "lora.safetensors", b"", b"{}", length=0)
    assert_names(refused(path), path, value=0, limit=2)


@pytest.mark.parametrize(
    "raw, says",
    [
        (b'{"a\xff": 1}', ["not valid UTF-8", "byte 3", "\\xff"]),
        (b'{"a": }', ["not valid JSON", "Expecting value"]),
        (b'{"a": {"dtype": "F32"', ["not valid JSON"]),
        (b'{"a": {"shape": [1' + b"0" * 5000 + b"]}}", ["not valid JSON", "digits"]),
        (b"[]", ["must be a JSON object", "starts with b'[]'"]),
        (b'"just a string"', ["must be a JSON object"]),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["nests JSON deeper"]),
    ],
    ids=["utf8", "json", "unterminated", "huge-int", "array", "string", "deep-nesting"],
)
def test_header_not_a_json_object(tmp_path, raw, says):
    path = write_st(tmp_path / "lora.safetensors", raw)
    assert_names(refused(path), path, says=says)


@pytest.mark.parametrize(
    "raw, key",
    [
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "a"),
        (b'{"a": {"dtype": "F32", "dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}', "dtype"),
        (b'{"__metadata__": {"k": "1", "k": "2"}, "a": {}}', "k"),
    ],
    ids=["tensor", "field", "metadata"],
)
def test_duplicate_keys(tmp_path, raw, key):
    path = write_st(tmp_path / "lora.safetensors", raw, f32(1))
    assert_names(refused(path), path, key=key, value=2, limit=1, says=["appears 2 times"])


def test_lone_surrogate_key_refused(tmp_path):
    path = write_st(tmp_path / "lora.safetensors", {"a\ud800": entry("F32", (1,), (0, 4))}, f32(1))
    assert_names(refused(path), path, key="a\ud800", says=["surrogate"])


# ---------------------------------------------------------------------------------- __metadata__


@pytest.mark.parametrize("metadata", [["a", "b"], "text", 3], ids=["list", "string", "number"])
def test_metadata_not_an_object(tmp_path, metadata):
    header = {"__metadata__": metadata, "a": entry("F32", (1,), (0, 4))}
    path = write_st(tmp_path / "lora.safetensors", header, f32(1))
    assert_names(refused(path), path, key="__metadata__", says=["must be an object of string to string"])


@pytest.mark.parametrize("value", [8, 1.5, None, True, {"nested": "x"}, ["x"]])
def test_metadata_value_not_a_string(tmp_path, value):
    header = {"__metadata__": {"ss_network_alpha": value}, "a": entry("F32", (1,), (0, 4))}
    path = write_st(tmp_path / "lora.safetensors", header, f32(1))
    assert_names(refused(path), path, key="ss_network_alpha", value=value, says=["must be strings"])


def test_metadata_limits(tmp_path):
    tensor = {"a": entry("F32", (1,), (0, 4))}
    many_entries = {"__metadata__": {f"k{i}": "v" for i in range(9)}, **tensor}
    many = write_st(tmp_path / "many.safetensors", many_entries, f32(1))
    err = refused(many, limits=Limits(max_metadata_entries=8))
    assert_names(err, many, key="__metadata__", value=9, limit=8, says=["max_metadata_entries"])

    big = write_st(tmp_path / "big.safetensors", {"__metadata__": {"tags": "é" * 600}, **tensor}, f32(1))
    err = refused(big, limits=Limits(max_metadata_value_bytes=1000))
    assert_names(err, big, key="tags", value=1200, limit=1000, says=["max_metadata_value_bytes"])

    two_big = {"__metadata__": {"a": "x" * 600, "b": "y" * 600}, **tensor}
    total = write_st(tmp_path / "total.safetensors", two_big, f32(1))
    err = refused(total, limits=Limits(max_metadata_total_bytes=1000))
    assert_names(err, total, key="__metadata__", value=1202, limit=1000, says=["max_metadata_total_bytes"])


# ----------------------------------------------------------------------------- tensor entries


@pytest.mark.parametrize("dtype", ["F33", "f32", "F4", "F8_E8M0", "", 5, ["F32"], None])
def test_unknown_dtype_lists_supported(tmp_path, dtype):
    path = write_st(tmp_path / "lora.safetensors", {"a": entry(dtype, (1,), (0, 4))}, f32(1))
    err = refused(path)
    assert_names(err, path, key="a", value=dtype, says=["not supported", ", ".join(SUPPORTED_DTYPES)])
    assert err.limit == list(SUPPORTED_DTYPES)


@pytest.mark.parametrize(
    "shape", ["2", [2.0], [-1], [True], [None], [[2]], {"0": 2}, None], ids=lambda s: repr(s)
)
def test_shape_not_a_list_of_non_negative_ints(tmp_path, shape):
    header = {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}
    path = write_st(tmp_path / "lora.safetensors", header, f32(1, 2))
    assert_names(refused(path), path, key="a", value=shape, says=["not a list of non-negative integers"])


def test_shape_nan_literal(tmp_path):
    raw = b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'
    path = write_st(tmp_path / "lora.safetensors", raw, f32(1))
    assert_names(refused(path), path, key="a", says=["[nan]", "not a list of non-negative integers"])


def test_too_many_dims(tmp_path):
    path = write_st(tmp_path / "lora.safetensors", {"a": entry("F32", [1] * 9, (0, 4))}, f32(1))
    assert_names(refused(path), path, key="a", value=9, limit=DEFAULT_LIMITS.max_dims, says=["max_dims"])


@pytest.mark.parametrize(
    "shape, value, limit, says",
    [
        ([0, 2**40], 2**40, DEFAULT_LIMITS.max_dim_size, ["max_dim_size"]),  # empty, yet absurd
        ([2**40, 0], 2**40, DEFAULT_LIMITS.max_dim_size, ["max_dim_size"]),
        ([2**20, 2**20, 2**20], 2**60, DEFAULT_LIMITS.max_tensor_elements, ["max_tensor_elements"]),
        # 2**96 elements: overflows int64 products; caught with Python ints.
        ([2**24] * 4, 2**96, DEFAULT_LIMITS.max_tensor_elements, ["max_tensor_elements"]),
    ],
    ids=["empty-huge-dim", "huge-dim-first", "too-many-elements", "int64-overflow"],
)
def test_absurd_dimensions(tmp_path, shape, value, limit, says):
    path = write_st(tmp_path / "lora.safetensors", {"a": entry("F32", shape, (0, 0))})
    assert_names(refused(path), path, key="a", value=value, limit=limit, says=says)


@pytest.mark.parametrize(
    "entry_value, says",
    [
        ([1, 2], ["array", "not an object"]),
        ({"dtype": "F32", "shape": [1]}, ["missing ['data_offsets']"]),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}, ["unknown ['extra']"]),
    ],
    ids=["list", "missing", "extra"],
)
def test_entry_fields(tmp_path, entry_value, says):
    path = write_st(tmp_path / "lora.safetensors", {"a": entry_value}, f32(1))
    assert_names(refused(path), path, key="a", says=says)


@pytest.mark.parametrize(
    "offsets",
    [[0], [0, 4, 8], [0.0, 4.0], [-4, 0], [False, 4], ["0", "4"], "0-4", None],
    ids=lambda o: repr(o),
)
def test_data_offsets_not_two_ints(tmp_path, offsets):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    path = write_st(tmp_path / "lora.safetensors", header, f32(1))
    assert_names(refused(path), path, key="a", value=offsets, says=["not two non-negative integers"])


def test_data_offsets_begin_after_end(tmp_path):
    path = write_st(tmp_path / "lora.safetensors", {"a": entry("F32", (0,), (8, 4))}, f32(1, 2))
    assert_names(refused(path), path, key="a", value=[8, 4], limit=4, says=["begin after they end"])


def test_byte_length_disagrees_with_dtype_and_shape(tmp_path):
    path = write_st(tmp_path / "lora.safetensors", {"a": entry("F16", (2, 2), (0, 16))}, f32(1, 2, 3, 4))
    assert_names(refused(path), path, key="a", value=16, limit=8, says=["F16", "[2, 2]"])


def test_end_beyond_data_section(tmp_path):
    header = {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (250,), (8, 1008))}
    path = write_st(tmp_path / "lora.safetensors", header, f32(1, 2, 3))
    assert_names(refused(path), path, key="b", value=1008, limit=12, says=["beyond its end", "truncated"])


def test_truncated_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"a": torch.ones(16), "b": torch.ones(16)}, path)
    data_size = path.stat().st_size - inspect_header(path).data_start
    path.write_bytes(path.read_bytes()[:-10])
    err = refused(path)
    says = ["truncated", "download the file again"]
    assert_names(err, path, key="b", value=data_size, limit=data_size - 10, says=says)


def test_overlapping_offsets(tmp_path):
    header = {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (4, 12))}
    path = write_st(tmp_path / "lora.safetensors", header, f32(1, 2, 3))
    assert_names(refused(path), path, key="b", value=4, limit=8, says=["overlap tensor 'a'"])


def test_two_names_for_the_same_bytes(tmp_path):
    header = {"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (0, 8))}
    path = write_st(tmp_path / "lora.safetensors", header, f32(1, 2))
    assert_names(refused(path), path, key="b", value=0, limit=8, says=["overlap tensor 'a'"])


def test_gap_between_tensors(tmp_path):
    header = {"a": entry("F32", (1,), (0, 4)), "b": entry("F32", (1,), (8, 12))}
    path = write_st(tmp_path / "lora.safetensors", header, f32(1, 2, 3))
    assert_names(refused(path), path, key="b", value=8, limit=4, says=["gap of 4 unused bytes", "tensor 'a'"])


def test_gap_before_first_tensor(tmp_path):
    path = write_st(tmp_path / "lora.safetensors", {"a": entry("F32", (1,), (4, 8))}, f32(1, 2))
    assert_names(refused(path), path, key="a", value=4, limit=0, says=["after the header"])


def test_unused_trailing_bytes(tmp_path):
    path = write_st(tmp_path / "lora.safetensors", {"a": entry("F32", (1,), (0, 4))}, f32(1) + b"hidden payload")
    assert_names(refused(path), path, value=14, limit=0, says=["unused bytes follow the last tensor", "'a'"])


# --------------------------------------------------------------------------- counts, bounded


def many_tensors_header(count: int) -> bytes:
    body = ",".join(
        f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(count)
    )
    return ("{" + body + "}").encode()


def test_300k_tensors_refused_before_parsing(tmp_path):
    count = 300_000
    path = write_st(tmp_path / "lora.safetensors", many_tensors_header(count), b"\x00" * (4 * count))
    start = time.perf_counter()
    err = refused(path)
    elapsed = time.perf_counter() - start
    assert_names(err, path, value=count, limit=DEFAULT_LIMITS.max_tensors, says=["max_tensors", "declares"])
    print(f"300k-tensor header refused in {elapsed:.3f} s")  # informational; no timing assertion


def test_tensor_count_above_limit(tmp_path):
    path = write_st(tmp_path / "lora.safetensors", many_tensors_header(4), b"\x00" * 16)
    assert_names(refused(path, limits=Limits(max_tensors=3)), path, value=4, limit=3, says=["max_tensors"])
    assert len(read_lora_file(path, limits=Limits(max_tensors=4)).tensors) == 4


@pytest.mark.parametrize(
    "raw, found, value, limit",
    [
        # Limits below: 62 strings, 12 objects, 160 values (10 tensors of 8 dims, 4 metadata entries).
    # Objects without data_offsets dodge the declared-tensor count; the object count still holds.
        (b"{" + b",".join(b'"t%d":{}' % i for i in range(20)) + b"}", "JSON objects", 21, 12),
        # Memory bombs: a 3-byte '[],' becomes a 64-byte list; '"",' a 50-byte string.
        (b'{"a":[' + b",".join([b"[]"] * 400) + b"]}", "JSON values", 801, 160),
        (b'{"a":[' + b",".join([b'"x"'] * 400) + b"]}", "strings", 401, 62),
        (b'{"a":[' + b",".join([b"0"] * 400) + b"]}", "JSON values", 401, 160),
    ],
    ids=["objects", "lists", "strings", "ints"],
)
def test_header_bombs_refused_before_parsing(tmp_path, raw, found, value, limit):
    path = write_st(tmp_path / "lora.safetensors", raw)
    limits = Limits(max_tensors=10, max_metadata_entries=4, max_dims=8)
    err = refused(path, limits=limits)
    assert_names(err, path, value=value, limit=limit, says=[found, "refused before parsing"])


def test_escaped_quotes_do_not_fool_the_counts(tmp_path):
    # Braces and quotes inside metadata strings (kohya stores JSON in strings) are not structure.
    tags = json.dumps({f"tag{i}": i for i in range(50)} | {'q"uote\\': '{[,]}'})
    header = {"__metadata__": {"ss_tag_frequency": tags}, "a": entry("F32", (1,), (0, 4))}
    path = write_st(tmp_path / "lora.safetensors", header, f32(1))
    got = read_lora_file(path, limits=Limits(max_tensors=1, max_metadata_entries=1))
    assert got.metadata["ss_tag_frequency"] == tags


# --------------------------------------------------------------------------------- the values


def bf16(*values: float) -> bytes:
    return b"".join(struct.pack("<f", v)[2:] for v in values)


@pytest.mark.parametrize(
    "dtype, data, count, nans, infs",
    [
        ("F32", f32(1, NAN, INF, -INF, 0), 5, 1, 2),
        ("F64", struct.pack("<3d", NAN, NAN, 1), 3, 2, 0),
        ("F16", struct.pack("<3e", 1, INF, 2), 3, 0, 1),
        ("BF16", bf16(1, NAN, 2, 3), 4, 1, 0),
        ("F8_E4M3", bytes([0x38, 0x7F, 0x38, 0xFF]), 4, 2, 0),  # e4m3fn: 0x7F/0xFF are NaN, no Inf
        ("F8_E5M2", bytes([0x3C, 0x7C, 0xFC, 0x7F]), 4, 1, 2),  # 0x7C/0xFC are +-Inf, 0x7F NaN
        ("C64", f32(1, 0, NAN, 0), 2, 1, 0),
    ],
)
def test_non_finite_values_refused(tmp_path, dtype, data, count, nans, infs):
    good = f32(1, 2)
    header = {"ok": entry("F32", (2,), (0, 8)), "lora.up.weight": entry(dtype, (count,), (8, 8 + len(data)))}
    path = write_st(tmp_path / "lora.safetensors", header, good + data)
    err = refused(path)
    assert_names(
        err,
        path,
        key="lora.up.weight",
        value=nans + infs,
        limit=0,
        says=[f"{nans} NaN", f"{infs} infinite", f"out of {count}", dtype, "Fix:"],
    )


def test_bool_bytes_other_than_0_and_1(tmp_path):
    path = write_st(tmp_path / "lora.safetensors", {"mask": entry("BOOL", (4,), (0, 4))}, bytes([0, 1, 2, 255]))
    assert_names(refused(path), path, key="mask", value=2, limit=0, says=["other than 0 or 1"])


# --------------------------------------------------------------------------------- the API


def test_error_survives_pickling(tmp_path):
    err = LoRAFileError(tmp_path / "x.safetensors", "bad.", key="k", value=3, limit=2, fix="do it.")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.path, back.key, back.value, back.limit, back.fix) == (
        str(err), err.path, err.key, err.value, err.limit, err.fix
    )
    assert str(err).endswith("Fix: do it.")
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("name", ["max_tensors", "max_header_bytes", "max_dims"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_limits_must_be_positive_ints(name, bad):
    with pytest.raises(ValueError, match=name):
        Limits(**{name: bad})


def test_truncated_file_whose_length_looks_like_text(tmp_path):
    # Header length 123 = b"{\0\0...": a truncated file must not be called a JSON document.
    header = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    header += b" " * (123 - len(header))
    path = write_st(tmp_path / "lora.safetensors", header[:60], length=123)
    assert_names(refused(path), path, value=123, limit=60, says=["truncated"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
def test_named_pipe_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    assert_names(refused(path), path, says=["not a regular file"])


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("position", [0, 7, 8, 15, 16, 31, 500, 999])
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_found_at_every_position(tmp_path, dtype, position, bad):
    # Vectorised reductions treat heads, bodies and tails of a buffer differently: try them all.
    values = torch.ones(1000, dtype=SUPPORTED_DTYPES[dtype])
    values[position] = bad
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"w": values}, path)
    assert_names(refused(path), path, key="w", value=1, limit=0)


def test_known_fingerprint_is_reported_without_rehashing(tmp_path):
    import torch
    from safetensors.torch import save_file

    from loraloom.graph_runtime import file_fingerprint
    from loraloom.lora.safefile import read_lora_file

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(4)}, str(path))
    digest = file_fingerprint(path)
    assert read_lora_file(path).fingerprint == digest, "the reader's own hash equals the runtime's"
    vouched = read_lora_file(path, known_fingerprint="f" * 32)
    assert vouched.fingerprint == "f" * 32 and torch.equal(vouched.tensors["a"], torch.ones(4))


def test_a_same_size_rewrite_during_the_read_is_refused_not_mixed(tmp_path, monkeypatch):
    from loraloom.lora import safefile

    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"a": torch.ones(1000), "b": torch.ones(1000)}, path)
    rewritten = tmp_path / "new.safetensors"
    safetensors.torch.save_file({"a": torch.full((1000,), 2.0), "b": torch.full((1000,), 2.0)}, rewritten)
    assert rewritten.stat().st_size == path.stat().st_size
    monkeypatch.setattr(safefile, "HASH_CHUNK_BYTES", 4000)  # one tensor per slice read
    check = safefile._maybe_bad
    seen = []

    def writer_between_slices(raw, dtype):
        # Another program rewrites the file in place after the first tensor was read.
        if not seen:
            time.sleep(0.02)  # past the filesystem's timestamp tick
            with open(path, "r+b") as f:
                f.write(rewritten.read_bytes())
        seen.append(raw.view(dtype)[0].item())
        return check(raw, dtype)

    monkeypatch.setattr(safefile, "_maybe_bad", writer_between_slices)
    err = refused(path)
    assert err.kind == "changed_while_reading", err
    assert_names(err, path, says=["changed while it was being read", "mix of old and new"])
    assert seen == [1.0, 2.0], "the second tensor came from the new bytes: only the state shows it"


def test_known_fingerprint_for_another_state_is_not_used(tmp_path):
    from loraloom.graph_runtime import FileState, KnownFingerprint

    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file({"a": torch.ones(4)}, path)
    state = FileState.of(path.stat())
    assert read_lora_file(path, known_fingerprint=KnownFingerprint("f" * 32, state)).fingerprint == "f" * 32
    other = state._replace(ctime_ns=state.ctime_ns - 1)  # the file changed since that digest was taken
    assert read_lora_file(path, known_fingerprint=KnownFingerprint("f" * 32, other)).fingerprint == \
        file_fingerprint(path), "a digest for another state is not trusted: the bytes are hashed"


@pytest.mark.parametrize("make", ["fifo", "dev_zero_link", "directory"])
def test_odd_files_are_refused_without_opening(tmp_path, make):
    path = tmp_path / "odd.safetensors"
    if make == "fifo":
        os.mkfifo(path)
    elif make == "dev_zero_link":
        os.symlink("/dev/zero", path)
    else:
        path.mkdir()
    start = time.monotonic()
    err = refused(path)
    assert time.monotonic() - start < 2 and err.kind == "not_regular", err
    assert_names(err, path, says=["not a regular file"])


# --------------------------------------------------------------------- the read path's parts


@pytest.mark.parametrize("overlap", [True, False], ids=["hash-beside", "hash-inline"])
def test_every_fixture_reads_as_safetensors_does_with_its_sha256(lora_files, monkeypatch, overlap):
    from loraloom.lora import safefile

    # Fixtures are small: force (or forbid) the hashing thread that real-size files get.
    monkeypatch.setattr(safefile, "_OVERLAP_MIN_BYTES", 0 if overlap else 2**62)
    for name, path in lora_files.items():
        path = Path(path)
        if path.is_dir():
            path = path / "adapter_model.safetensors"
        got = read_lora_file(path)
        want = safetensors.torch.load_file(path)
        assert list(got.tensors) == sorted(want), name
        assert all(same_tensor(got.tensors[k], want[k]) for k in want), name
        assert got.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest() == file_fingerprint(path), name


def _hash_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "loraloom-hash"]


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64", "C64", "F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("where", ["first", "chunk end", "chunk start", "last"])
def test_non_finite_at_check_chunk_boundaries_refused_with_its_count(tmp_path, monkeypatch, dtype, where):
    from loraloom.lora import safefile

    monkeypatch.setattr(safefile, "_FINITE_CHUNK_ELEMENTS", 64)  # the bit test's chunk, made small
    monkeypatch.setattr(safefile, "_OVERLAP_MIN_BYTES", 0)  # and the hashing thread on, as for real files
    torch_dtype = SUPPORTED_DTYPES[dtype]
    values = torch.ones(200, dtype=torch.float32).to(torch_dtype)
    position = {"first": 0, "chunk end": 63, "chunk start": 64, "last": 199}[where]
    if torch_dtype == torch.complex64:
        values[position] = complex(1.0, NAN)
        count, nans, infs = 200, 1, 0
    else:
        bad = NAN if dtype == "F8_E4M3" else INF  # e4m3fn has no infinity
        values[position] = torch.tensor(bad).to(torch_dtype)
        count, nans, infs = 200, int(bad != bad), int(bad == INF)
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"ok": torch.ones(3), "w": values}, path)
    assert_names(refused(path), path, key="w", value=1, limit=0,
                 says=[f"{nans} NaN", f"{infs} infinite", f"out of {count}", dtype])
    assert not _hash_threads(), "a refusal half-way ends the hashing thread"


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"])
def test_the_bit_test_agrees_with_torch_on_every_bit_pattern(dtype):
    from loraloom.lora.safefile import _bad_values, _maybe_bad

    def refuses(raw, dtype):  # what _check_values decides: the bit test, then torch's count
        return _maybe_bad(raw, dtype) and sum(_bad_values(raw.view(dtype), raw)) > 0

    torch_dtype = SUPPORTED_DTYPES.get(dtype)
    if torch_dtype is None:
        pytest.skip(f"this torch has no {dtype}")
    bits = torch.arange(2 ** (8 * torch_dtype.itemsize), dtype=torch.int32)
    raw = (bits.to(torch.int16) if torch_dtype.itemsize == 2 else bits.to(torch.uint8)).view(torch.uint8)
    values = raw.view(torch_dtype).float()
    finite = values.isfinite()
    ok = raw.view(torch_dtype)[finite].contiguous().reshape(-1).view(torch.uint8)
    assert not refuses(ok, torch_dtype), f"every finite {dtype} pattern passes"
    for pattern in bits[~finite].tolist():
        one = torch.cat([ok[: 2 * torch_dtype.itemsize], raw.view(torch_dtype)[pattern:pattern + 1].view(torch.uint8)])
        assert refuses(one, torch_dtype), f"{dtype} pattern {pattern:#x} is refused"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_the_bit_test_agrees_with_torch_on_wide_formats(dtype):
    from loraloom.lora.safefile import _maybe_bad

    info = torch.finfo(dtype if not dtype.is_complex else torch.float32)
    edges = [0.0, -0.0, info.tiny, info.smallest_normal / 2, info.max, -info.max, 1.0, -1.0]
    finite = torch.tensor(edges, dtype=dtype)
    assert not _maybe_bad(finite.view(torch.uint8), dtype)
    width = {torch.float32: torch.int32, torch.float64: torch.int64, torch.complex64: torch.int32}[dtype]
    exponent = {torch.int32: 0x7F80_0000, torch.int64: 0x7FF0_0000_0000_0000}[width]
    for extra in (0, 1, 12345, -1 - exponent + (2 ** (width.itemsize * 8 - 1))):  # inf, NaNs up to all ones
        for sign in (1, -1):
            bad = finite.clone()
            flat = bad.view(width)
            flat[3] = sign * (exponent + extra) if sign > 0 else -(2 ** (width.itemsize * 8 - 1)) + exponent + extra
            assert not bad.view(width)[3:4].view(dtype if not dtype.is_complex else torch.float32).isfinite().all()
            assert _maybe_bad(bad.view(torch.uint8), dtype), (dtype, sign, extra)


def test_a_file_truncated_during_the_read_is_refused_not_a_crash(tmp_path, monkeypatch):
    from loraloom.lora import safefile

    monkeypatch.setattr(safefile, "_OVERLAP_MIN_BYTES", 0)
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"a": torch.ones(1000), "b": torch.ones(1000)}, path)
    monkeypatch.setattr(safefile, "HASH_CHUNK_BYTES", 4000)  # one tensor per slice read
    check = safefile._maybe_bad
    seen = []

    def truncate_after_first(raw, dtype):
        # Another program truncates the file (an mmap of it would now SIGBUS on the lost pages).
        if not seen:
            os.truncate(path, path.stat().st_size - 2000)
        seen.append(dtype)
        return check(raw, dtype)

    monkeypatch.setattr(safefile, "_maybe_bad", truncate_after_first)
    err = refused(path)
    assert err.kind == "changed_while_reading", err
    assert not _hash_threads()


def test_scan_file_hashes_on_its_read_as_file_fingerprint_does(tmp_path, monkeypatch):
    from loraloom.lora import safefile

    monkeypatch.setattr(safefile, "_SCAN_SLICE_BYTES", 96)  # many slices per tensor
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"a": torch.randn(100), "b": torch.randn(7, 9).half()}, path)
    header = safefile.scan_file(path, safefile.LORA, fingerprint=True)
    assert header.digest == hashlib.sha256(path.read_bytes()).hexdigest() == file_fingerprint(path)
    assert safefile.scan_file(path, safefile.LORA).digest is None


@pytest.mark.parametrize("position", [0, 23, 24, 99])
def test_scan_file_refuses_non_finite_at_its_slice_boundaries(tmp_path, monkeypatch, position):
    from loraloom.lora import safefile

    monkeypatch.setattr(safefile, "_SCAN_SLICE_BYTES", 96)  # 24 float32 values per slice
    values = torch.ones(100)
    values[position] = NAN
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"w": values}, path)
    with pytest.raises(LoRAFileError) as info:
        safefile.scan_file(path, safefile.LORA, fingerprint=True)
    assert_names(info.value, path, key="w", value=1, limit=0, says=["1 NaN", "out of 100"])
