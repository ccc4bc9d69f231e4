"""lora/sniff.py: what a file is from its first bytes, by hand-built heads (no files).
How safefile turns each verdict into an error message is tested in test_safefile.py."""
from __future__ import annotations

import io
import struct
import zipfile

import pytest

from loraloom.lora.sniff import sniff


def safetensors_head(length: int) -> bytes:
    return struct.pack("<Q", length) + b"{" + b" " * (length - 1)


def test_safetensors_signature_wins_over_text_looking_prefixes():
    head = safetensors_head(60)  # 60 is '<': the prefix starts like markup
    assert head[:1] == b"<"
    assert sniff(head, size=68).kind == "safetensors"


def test_header_length_beyond_the_file_is_not_safetensors():
    head = safetensors_head(60)
    verdict = sniff(head, size=67)  # one byte short of the header
    assert verdict.kind == "unknown", "a NUL in the first 8 bytes is never text, so not markup either"
    assert verdict.fix is None


@pytest.mark.parametrize("protocol, kind", [(1, "unknown"), (2, "pickle"), (5, "pickle"), (6, "unknown")])
def test_pickle_protocols_two_to_five(protocol, kind):
    verdict = sniff(bytes([0x80, protocol]) + b"}q\x00", size=100)
    assert verdict.kind == kind
    if kind == "pickle":
        assert f"protocol {protocol}" in verdict.what


def _zip_with(member: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(member, b"x")
    return buffer.getvalue()


@pytest.mark.parametrize("member, kind", [
    ("archive/data.pkl", "torch-zip"),
    ("model/.format_version", "torch-zip"),
    ("my_lora.safetensors", "archive"),
])
def test_zip_tells_torch_save_from_an_archive(member, kind):
    verdict = sniff(_zip_with(member), size=1000)
    assert verdict.kind == kind
    if kind == "archive":
        assert "'my_lora.safetensors'" in verdict.what and verdict.fix.startswith("unzip")


@pytest.mark.parametrize("magic, what", [(b"7z\xbc\xaf\x27\x1c", "7-Zip"), (b"Rar!\x1a\x07", "RAR")])
def test_other_archives(magic, what):
    verdict = sniff(magic + b"\x00" * 20, size=1000)
    assert verdict.kind == "archive" and what in verdict.what and "extract it" in verdict.fix


def test_lfs_pointer_without_size_or_oid():
    verdict = sniff(b"version https://git-lfs.github.com/spec/v1\n", size=44)
    assert verdict.kind == "lfs" and "the real file was never downloaded" in verdict.what


def test_markup_after_bom_and_whitespace():
    html = sniff(b"\xef\xbb\xbf \r\n<!DOCTYPE HTML><title>" + b"x" * 200 + b"</title>", size=300)
    assert html.kind == "html" and "titled '" + "x" * 80 + "'" in html.what, "the title is cut at 80 characters"
    xml = sniff(b"\n<?xml version='1.0'?><Error/>", size=40)
    assert xml.kind == "xml" and html.fix == xml.fix


def test_json_array_and_plain_text():
    assert sniff(b'  [{"error": 1}]', size=16).kind == "json"
    plain = sniff(b"hello world", size=11)
    assert plain.kind == "unknown" and "b'hello world'" in plain.what
