"""Tell what a file really is from its first bytes, whatever its name says.

Downloads from strangers go wrong in a handful of recognisable ways: a site's login or error page
saved under the model's name, a Git LFS pointer instead of the file it points to, a PyTorch pickle
renamed to ``.safetensors``, an archive nobody unpacked. This module only looks at bytes and
returns a verdict; ``safefile`` turns verdicts into errors. Nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SNIFF_BYTES = 4096
"""How many leading bytes ``sniff`` wants to see (fewer are fine for short files)."""

LFS_SIGNATURE = b"version https://git-lfs.github.com/spec/"

# Kinds that torch.load can read, so allow_pickle=True may accept them.
PICKLE_KINDS = frozenset({"torch-zip", "pickle"})


@dataclass(frozen=True)
class Verdict:
    """What the leading bytes say a file is.

    ``kind`` is one of: ``safetensors`` (the 8-byte length prefix is followed by ``{``),
    ``torch-zip``, ``pickle``, ``html``, ``xml``, ``json``, ``lfs``, ``archive``, ``gguf`` or
    ``unknown``. ``what`` is a phrase for an error message ("an HTML page titled 'Sign in'"),
    ``fix`` the advice that goes with it, or None.
    """

    kind: str
    what: str
    fix: str | None = None


_ARCHIVES = (
    (b"\x1f\x8b", "a gzip-compressed file", "decompress it (gunzip) and load the file inside."),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it and load the .safetensors file inside."),
    (b"Rar!\x1a\x07", "a RAR archive", "extract it and load the .safetensors file inside."),
)
_REDOWNLOAD = (
    "download the file again from its direct file link; for Civitai or Hugging Face files that "
    "need a login, pass your API token to the downloader."
)
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
_TORCH_ZIP_MEMBERS = (b"data.pkl", b".format_version", b"byteorder", b"version")


def sniff(head: bytes, size: int) -> Verdict:
    """Classify a file from ``head`` (its first bytes, up to ``SNIFF_BYTES``) and its ``size``.

    The safetensors signature is tested first, so a real safetensors file is never mistaken for
    something else because its length prefix happens to look like text.
    """
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return Verdict("safetensors", "a safetensors file")
    if head.startswith(LFS_SIGNATURE):
        return _lfs_verdict(head)
    if head.startswith(b"PK\x03\x04"):
        return _zip_verdict(head)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return Verdict("pickle", f"a Python pickle (protocol {head[1]}; the legacy torch.save format)")
    if head.startswith(b"GGUF"):
        return Verdict(
            "gguf",
            "a GGUF file (a llama.cpp / ComfyUI-GGUF quantised model), not a LoRA",
            "load it with a GGUF loader; LoRA Loom reads LoRAs in safetensors format.",
        )
    for magic, what, fix in _ARCHIVES:
        if head.startswith(magic):
            return Verdict("archive", what, fix)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"\x00" in head[:8]:
        # A safetensors length prefix (< 2**32) has NUL bytes; text never does. Without this, a
        # truncated safetensors file whose length's low byte is '{' or '<' would pass for text.
        return Verdict("unknown", f"an unrecognised file (it starts with {head[:16]!r})")
    if text.startswith(b"<"):
        return _markup_verdict(head, text)
    if text.startswith((b"{", b"[")):
        return Verdict(
            "json",
            f"a JSON text document, not a safetensors file (it starts with {_snippet(head)}); "
            "a server may have sent an error message instead of the file",
            _REDOWNLOAD,
        )
    return Verdict("unknown", f"an unrecognised file (it starts with {head[:16]!r})")


def _lfs_verdict(head: bytes) -> Verdict:
    fields = dict(
        line.split(" ", 1) for line in head.decode("utf-8", "replace").splitlines() if " " in line
    )
    target = ""
    if fields.get("size", "").isdigit():
        target = f" the real {int(fields['size'])}-byte file"
    if "oid" in fields:
        target += f" ({fields['oid'][:80]})"
    return Verdict(
        "lfs",
        f"a Git LFS pointer (a small text file), not the file itself:{target or ' the real file'} "
        "was never downloaded",
        "run `git lfs install` once, then `git lfs pull` in that repository clone, or "
        "download the file directly.",
    )


def _zip_verdict(head: bytes) -> Verdict:
    # Local file header: the first member's name length sits at offset 26, the name at 30.
    name_len = int.from_bytes(head[26:28], "little") if len(head) >= 30 else 0
    first_name = head[30 : 30 + name_len]
    if first_name.endswith(_TORCH_ZIP_MEMBERS) or b"data.pkl" in head:
        return Verdict("torch-zip", "a PyTorch checkpoint written by torch.save (a ZIP archive holding a pickle)")
    return Verdict(
        "archive",
        f"a ZIP archive (first member {first_name[:80]!r})",
        "unzip it and load the .safetensors file inside.",
    )


def _markup_verdict(head: bytes, text: bytes) -> Verdict:
    title = _TITLE.search(head)
    titled = ""
    if title:
        titled = " titled " + repr(title.group(1).decode("utf-8", "replace").strip()[:80])
    if text.startswith(b"<!doctype html") or b"<html" in text[:1024]:
        return Verdict(
            "html",
            f"an HTML web page{titled}, not a safetensors file: the download saved a login, error or "
            "confirmation page instead of the model",
            _REDOWNLOAD,
        )
    return Verdict(
        "xml",
        f"an XML/markup document (it starts with {_snippet(head)}), not a safetensors file: a server "
        "sent an error document (S3 and other storage services answer errors in XML)",
        _REDOWNLOAD,
    )


def _snippet(head: bytes, length: int = 80) -> str:
    return repr(head[:length].decode("utf-8", "replace"))
