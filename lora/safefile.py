"""The strict reader for safetensors files from strangers: LoRAs, and base checkpoints' weights.

Every LoRA file enters LoRA Loom through ``read_lora_file`` (tensors) or ``inspect_header`` (keys,
dtypes and shapes only); every base checkpoint's weights file passes ``scan_file`` before diffusers
opens it. All three treat the file as hostile: the header is size-checked before it is read, counted
before it is parsed, and validated field by field before a byte of tensor data is read; tensor data
is read once (hashed as it streams in, for LoRAs, by a worker thread beside the reads) and checked
for NaN/Inf before anything is returned. Every failure names the file, the key, the offending
value and the limit it broke, with a ``Fix:`` where there is one: a ``LoRAFileError`` for LoRAs,
the error class of the caller's :class:`FileRole` for other files.

safetensors layout (https://github.com/huggingface/safetensors#format): an 8-byte little-endian
header length N, N bytes of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}``, then the data section; offsets are relative to the data section,
and the tensors must tile it exactly, without overlaps, gaps or trailing bytes.

Pickle checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are refused unless the caller passes
``allow_pickle=True``, and are then read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import queue
import re
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


from ..graph_runtime import HASH_CHUNK_BYTES, FileError, KnownFingerprint, file_hasher, open_regular
from ..graph_runtime.errors import InputError, LoomError
from ..graph_runtime.files import state_of
from ..graph_runtime.errors import show as _show
from .sniff import PICKLE_KINDS, SNIFF_BYTES, sniff

__all__ = [
    "DEFAULT_LIMITS",
    "SUPPORTED_DTYPES",
    "Header",
    "LoRAFileError",
    "Limits",
    "SafeFile",
    "FileRole",
    "LORA",
    "TensorInfo",
    "inspect_header",
    "read_checked_file",
    "read_lora_file",
    "scan_file",
]

METADATA_KEY = "__metadata__"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
# Bounds the float32 copies the NaN/Inf count makes of float8 tensors.
_FINITE_CHUNK_ELEMENTS = 2**24
# Below this much tensor data, hashing beside the reads costs more (a thread) than it saves.
_OVERLAP_MIN_BYTES = 16 * 2**20
# scan_file reads tensor data in slices this big into one reused buffer: its memory, whatever the file.
_SCAN_SLICE_BYTES = 64 * 2**20


# safetensors dtype codes this reader accepts (the set safetensors.torch itself maps): code -> (torch
# dtype name, bytes per element); every one exists in torch>=2.4, which pyproject requires. Header
# checks need only this table, so checking a header (``inspect_header``: what ``loraloom validate``
# does to a workflow's LoRA files) imports neither torch nor numpy; reading values does.
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1), "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
}  # fmt: skip


@dataclass(frozen=True)
class _TorchTables:
    """The dtype tables that need torch: built on first use (``_tables``)."""

    dtypes: dict  # code -> torch dtype: SUPPORTED_DTYPES
    codes: dict  # torch dtype -> code
    upcast_for_finite: frozenset
    nonfinite_bits: dict


@functools.cache
def _tables() -> _TorchTables:
    import numpy as np
    import torch

    dtypes = {code: getattr(torch, name) for code, (name, _) in _DTYPES.items()}
    # The NaN/Inf test on bit patterns. With the sign bit masked off, a value of these formats is
    # NaN or infinite exactly when its bits are at least the all-ones exponent (IEEE 754; bf16 is
    # float32's top half; float8 e4m3fn has no infinity and one NaN pattern per sign, 0x7f; e5m2 is
    # IEEE-like). So, without building the masked copy: read as signed integers, the positive
    # non-finite patterns are the largest values; read as unsigned, the negative ones are. Two max
    # reductions over the bytes as they are. numpy runs them on one thread: torch's aminmax splits
    # any tensor over 32,768 elements across its threads, and on a busy 2-core machine each of a
    # LoRA's ~3,000 tensors then waited for a descheduled thread (2.5-13 s for an SDXL LoRA, against
    # 0.04 s here). (signed type, unsigned type, first non-finite pattern without its sign);
    # complex64 is two float32s. The rest (the fnuz float8s, whose NaN is the negative-zero pattern)
    # take torch's count directly.
    nonfinite_bits = {
        torch.float64: (np.int64, np.uint64, 0x7FF0_0000_0000_0000),
        torch.float32: (np.int32, np.uint32, 0x7F80_0000),
        torch.complex64: (np.int32, np.uint32, 0x7F80_0000),
        torch.float16: (np.int16, np.uint16, 0x7C00),
        torch.bfloat16: (np.int16, np.uint16, 0x7F80),
        torch.float8_e4m3fn: (np.int8, np.uint8, 0x7F),
        torch.float8_e5m2: (np.int8, np.uint8, 0x7C),
    }
    # torch has no aminmax/isfinite kernels for float8 on the CPU; their count upcasts slices to float32.
    upcast = frozenset(dtypes[c] for c in ("F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ"))
    return _TorchTables(dtypes, {dtype: code for code, dtype in dtypes.items()}, upcast, nonfinite_bits)


def __getattr__(name: str) -> Any:
    # SUPPORTED_DTYPES: the safetensors dtype codes this reader accepts, mapped to torch dtypes (the
    # set safetensors.torch itself maps). Built on first use: importing this module imports no torch.
    if name == "SUPPORTED_DTYPES":
        return _tables().dtypes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Limits:
    """Upper bounds a file must stay within; each refusal names the field to raise.

    Defaults are far above real LoRAs (an SDXL LoRA: 100-900 MB, ~2,300 tensors of at most 4 dims,
    a header under 1 MB) and far below what would exhaust a workstation.
    """

    max_file_bytes: int = 8 * 2**30
    max_header_bytes: int = 100_000_000  # safetensors' own limit
    max_tensors: int = 50_000
    max_metadata_entries: int = 4_096
    max_metadata_value_bytes: int = 16 * 2**20  # kohya's ss_tag_frequency can reach megabytes
    max_metadata_total_bytes: int = 64 * 2**20
    max_dims: int = 8
    max_dim_size: int = 2**24
    max_tensor_elements: int = 2**30

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"Limits.{f.name} must be a positive int, got {value!r}.", key=f"Limits.{f.name}",
                                 value=value, limit=1, kind="bad_limit",
                                 fix=f"give a whole number of at least 1 (the default is {f.default})")


DEFAULT_LIMITS = Limits()


class LoRAFileError(LoomError, ValueError):
    """A LoRA file was refused. The message names the file, the key (if any), the value and the limit.

    Fields as every `LoomError`: ``file`` (also ``path``, a Path), ``key`` (tensor or metadata key,
    or None when the problem is the file as a whole), ``value`` (what was found), ``limit`` (the bound
    it broke, or None), ``fix`` (advice, also in the message after ``Fix:``, or None).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        problem: str,
        *,
        key: str | None = None,
        value: Any = None,
        limit: Any = None,
        fix: str | None = None,
        what: str = "tensor",
    ) -> None:
        self.path = Path(path)
        self.problem = problem
        self.what = what
        super().__init__(problem, file=self.path, key=key, key_label=what, value=value, limit=limit, fix=fix)


@dataclass(frozen=True)
class FileRole:
    """What a safetensors file is for, as its refusals say it: the error they raise and the hints
    that differ between a LoRA and, say, a base checkpoint. The checks themselves are the same.

    error: called as ``error(path, problem, key=, value=, limit=, fix=, what=)`` (LoRAFileError's
    signature) to make each refusal; a LoomError. noun: what the file is ("LoRA file"). sizes: its
    usual size, after "usually". tensors: its usual tensor count ("an SDXL LoRA has about 2,300").
    raise_limit: the fix for a refusal by a limit, with ``{field}`` for the limit's name.
    not_finite: the fix for NaN or infinite values. pickle_option: what else a pickle's owner may do,
    after its conversion command ("" if nothing).
    """

    error: Any
    noun: str
    sizes: str
    tensors: str
    raise_limit: str
    not_finite: str
    pickle_option: str = ""


LORA = FileRole(
    LoRAFileError, "LoRA file", sizes="10 MB to 2 GB", tensors="an SDXL LoRA has about 2,300",
    raise_limit="if the file is trusted, pass limits=Limits({field}=...) with a larger value.",
    not_finite="the LoRA was saved from a diverged training run or overflowed in fp16: use another "
               "epoch's file, or re-export it in bf16 or fp32.",
    pickle_option=", or pass allow_pickle=True to load it with torch.load(weights_only=True)",
)
"""The role of LoRA files: refusals are LoRAFileErrors."""


@dataclass(frozen=True)
class Source:
    """The file being read and its role: every check takes one, and refuses through it."""

    path: Path
    role: FileRole = LORA

    def refuse(self, problem: str, **fields: Any) -> LoomError:
        """The error for ``problem`` with this file named."""
        return self.role.error(self.path, problem, **fields)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor as the header declares it; offsets are relative to the data section, as in the file."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of ``dtype``."""
        return _tables().dtypes[self.dtype]

    @property
    def numel(self) -> int:
        """Element count (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Byte length of the tensor's data."""
        return self.data_offsets[1] - self.data_offsets[0]


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: what ``inspect_header`` returns without reading tensor data.

    ``tensors`` maps key to ``TensorInfo``, sorted by key; ``data_start`` is the file offset of the
    data section (8 + header length).
    """

    path: Path
    size: int
    data_start: int
    tensors: dict[str, TensorInfo] = field(repr=False)
    metadata: dict[str, str] = field(repr=False)
    state: Any = field(default=None, repr=False, compare=False)
    """The file's ``FileState`` when it was read (set by ``scan_file``, which reads it through)."""
    digest: str | None = field(default=None, repr=False, compare=False)
    """The file's content fingerprint (``file_hasher``), when ``scan_file`` was asked to hash it."""

    def __repr__(self) -> str:
        return f"Header({str(self.path)!r}, {len(self.tensors)} tensors, {len(self.metadata)} metadata keys)"


@dataclass(frozen=True)
class SafeFile:
    """A LoRA file that passed every check: CPU tensors in their original dtypes, sorted by key.

    ``fingerprint`` is the file's digest under graph_runtime's one hashing contract (``file_hasher``):
    the same value as ``graph_runtime.file_fingerprint(path)``, so a LoRA value and its file input agree;
    ``format`` is ``"safetensors"`` or ``"pickle"`` (only with ``allow_pickle=True``).
    """

    path: Path
    tensors: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, str] = field(repr=False)
    fingerprint: str
    size: int
    format: str = "safetensors"
    state: Any = field(default=None, repr=False, compare=False)
    """The file's ``FileState`` (size, mtime, ctime, inode), unchanged from opening to the end of the read."""

    def __repr__(self) -> str:
        return (
            f"SafeFile({str(self.path)!r}, {len(self.tensors)} tensors, {self.size} bytes, "
            f"{self.format}, fingerprint {self.fingerprint[:16]}...)"
        )


def read_lora_file(
    path: str | os.PathLike, *, allow_pickle: bool = False, limits: Limits = DEFAULT_LIMITS,
    known_fingerprint: str | KnownFingerprint | None = None,
) -> SafeFile:
    """Read a LoRA file, refusing anything malformed, oversized, non-finite or unsafe.

    The content decides the format, not the name: safetensors bytes load under any name; web
    pages, Git LFS pointers, archives and pickles are named as what they are. Pickle checkpoints
    load only with ``allow_pickle=True``, through ``torch.load(weights_only=True)``. The file is
    read once (hashed as it streams) and nothing is returned unless the whole file passed.

    ``known_fingerprint``: the caller already hashed this file and vouches for it; the read then skips
    hashing and reports that fingerprint. A ``KnownFingerprint`` (digest and the file state it was
    computed in) is used only when the opened file is still in that state; a plain digest always.

    Only a regular file is opened (a FIFO or device is refused before it could block or never end),
    and a file whose state (size, mtime, ctime, inode) changes while it is read is refused rather
    than loaded as a mix of old and new bytes. Raises ``LoRAFileError`` (a ValueError) for every
    problem with the file, including a missing or unreadable one.
    """
    src = Source(Path(path))
    with _open_checked(src, limits) as (f, state):
        size = state.size
        verdict = _sniff_file(f, src, size)
        if verdict.kind in PICKLE_KINDS:
            if not allow_pickle:
                raise _pickle_refused(src, verdict.what)
            return _read_pickle(f, src, state, limits)
        if isinstance(known_fingerprint, KnownFingerprint):
            known_fingerprint = known_fingerprint.digest if known_fingerprint.state == state else None
        hasher = file_hasher() if known_fingerprint is None else _KnownDigest(known_fingerprint)
        with _hashing_beside(hasher, size) as hasher:
            header = _read_header(f, src, size, limits, hasher)
            tensors = _read_data(f, src, header, hasher)
            if state_of(f) != state:
                raise _changed_while_reading(src)
            digest = hasher.hexdigest()
    return SafeFile(src.path, tensors, header.metadata, digest, size, "safetensors", state)


def inspect_header(path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS, role: FileRole = LORA) -> Header:
    """Parse and validate a safetensors header without reading tensor data.

    Applies every check ``read_lora_file`` applies before its data read (sizes, counts, dtypes,
    shapes, offsets tiling the data section exactly, metadata), so a key list from here is
    trustworthy for matching. Pickle checkpoints are refused: they have no header to inspect
    without unpickling them. ``role``: whose file it is (its refusals' error class and hints).
    """
    src = Source(Path(path), role)
    with _open_checked(src, limits) as (f, state):
        verdict = _sniff_file(f, src, state.size)
        if verdict.kind in PICKLE_KINDS:
            raise _pickle_refused(src, verdict.what)
        return _read_header(f, src, state.size, limits, file_hasher())


def scan_file(path: str | os.PathLike, role: FileRole, limits: Limits = DEFAULT_LIMITS, *,
              fingerprint: bool = False) -> Header:
    """Check a safetensors file that a library will load itself (a base checkpoint's weights):
    everything ``read_lora_file`` checks, keeping no tensor.

    The header is validated as by ``inspect_header``, then the data section is read through once, in
    slices into one reused buffer, and every tensor's values checked (finite floats, 0/1 booleans),
    so memory stays at one slice whatever the file's size. Pickles are refused (``allow_pickle`` is
    for LoRAs only). Returns the header, with the ``FileState`` the whole read saw, so a caller can
    tell whether the file it hands on is still the one checked. ``fingerprint``: also hash the
    file on the same read, under graph_runtime's hashing contract (``file_hasher``), into the
    header's ``digest``: the same value as ``file_fingerprint(path)``, for one read instead of two.
    """
    src = Source(Path(path), role)
    with _open_checked(src, limits) as (f, state):
        verdict = _sniff_file(f, src, state.size)
        if verdict.kind in PICKLE_KINDS:
            raise _pickle_refused(src, verdict.what)
        hasher = file_hasher() if fingerprint else _NO_HASH
        header = _read_header(f, src, state.size, limits, hasher)
        _scan_data(f, src, header, hasher)
        if state_of(f) != state:
            raise _changed_while_reading(src)
    return replace(header, state=state, digest=hasher.hexdigest() if fingerprint else None)


def read_checked_file(header: Header, role: FileRole) -> dict[str, torch.Tensor]:
    """The tensors of the file ``scan_file`` returned ``header`` for, read into memory the process
    owns: one buffer, each tensor a view of it starting 64-byte aligned (as a fresh tensor does:
    unaligned data can take another BLAS path and change float results), read in file order, each
    byte once. Refused (as a file that changed while it was read) unless the file is in the state it
    was checked in (``header.state``) from opening to the last byte, so these are the checked values.
    Read with readinto, for the reasons ``_read_data`` gives."""
    import torch

    src = Source(header.path, role)
    order = sorted(header.tensors.items(), key=lambda item: item[1].data_offsets)
    places, end = [], 0
    for _, info in order:
        places.append(end)
        end += -(-info.nbytes // 64) * 64
    with _open_checked(src, replace(DEFAULT_LIMITS, max_file_bytes=max(header.size, 1))) as (f, state):
        if state != header.state:
            raise _changed_while_reading(src)
        data = torch.empty(end, dtype=torch.uint8)  # torch's CPU allocations are 64-byte aligned
        view = memoryview(data.numpy())
        f.seek(header.data_start)
        for (_, info), place in zip(order, places):
            _read_into(f, view[place : place + info.nbytes], src, _NO_HASH)
        if f.read(1) or state_of(f) != state:
            raise _changed_while_reading(src)
    return {key: data[place : place + info.nbytes].view(info.torch_dtype).view(info.shape)
            for (key, info), place in zip(order, places)}


@contextmanager
def _open_checked(src: Source, limits: Limits):
    """Open a regular file unbuffered (graph_runtime's ``open_regular``: never a FIFO or device), check
    its size against the limit before a byte is read, yield (file, FileState)."""
    with ExitStack() as stack:
        try:
            f, state = stack.enter_context(open_regular(src.path, src.role.noun))
        except FileError as exc:
            refused = src.refuse(exc.message, value=exc.value, fix=exc.fix)
            refused.kind = exc.kind
            raise refused from None
        size = state.size
        if size > limits.max_file_bytes:
            raise src.refuse(
                f"the file is {_bytes(size)}, above the limit of {_bytes(limits.max_file_bytes)} "
                f"(max_file_bytes); {src.role.noun}s are usually {src.role.sizes}.",
                value=size,
                limit=limits.max_file_bytes,
                fix=src.role.raise_limit.format(field="max_file_bytes"),
            )
        yield f, state


def _sniff_file(f, src: Source, size: int):
    head = f.read(SNIFF_BYTES)
    f.seek(0)
    if size == 0:
        raise src.refuse(
            "the file is empty: 0 bytes, less than the 8 bytes every safetensors file starts with "
            "(an interrupted download or copy).",
            value=0,
            limit=8,
            fix="download or copy the file again.",
        )
    verdict = sniff(head, size)
    if verdict.kind in ("safetensors", "unknown") or verdict.kind in PICKLE_KINDS:
        return verdict
    named = f"despite its {src.path.suffix} name, " if src.path.suffix else ""
    raise src.refuse(f"{named}this is {verdict.what}.", value=verdict.kind, fix=verdict.fix)


def _pickle_refused(src: Source, what: str) -> LoomError:
    path = src.path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        named = f"this {path.suffix} file is {what}"
    else:
        named = f"despite its {path.suffix or 'missing'} suffix, this is {what}"
    target = path.with_suffix(".safetensors")
    one_liner = (
        "python -c \"import torch, safetensors.torch as st; "
        f"sd = torch.load({str(path)!r}, map_location='cpu', weights_only=True); "
        f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, {str(target)!r})\""
    )
    return src.refuse(
        f"{named}. Loading a pickle can run any code its author put in the file, so "
        "only safetensors files are read by default.",
        value=what,
        fix=(
            f"convert it once to safetensors: {one_liner} (weights_only=True refuses code)"
            f"{src.role.pickle_option}."
        ),
    )


def _read_exact(f, n: int, src: Source, hasher) -> bytearray:
    # Into one preallocated buffer: joining chunks would hold the header twice.
    buffer = bytearray(n)
    _read_into(f, memoryview(buffer), src, hasher)
    return buffer


def _changed_while_reading(src: Source) -> LoomError:
    error = src.refuse(
        "the file changed while it was being read (another program is writing or replacing it), so "
        "what was read may be a mix of old and new bytes.",
        fix="wait until the download or copy has finished, then load it again.",
    )
    error.kind = "changed_while_reading"
    return error


# ---------------------------------------------------------------------------------------- header


def _read_header(f, src: Source, size: int, limits: Limits, hasher) -> Header:
    if size < 8:
        raise src.refuse(
            f"the file is only {size} bytes, less than the 8-byte header length every safetensors "
            f"file starts with (it holds {_head(f)!r}).",
            value=size,
            limit=8,
            fix="download or copy the file again.",
        )
    length = int.from_bytes(_read_exact(f, 8, src, hasher), "little")
    if length == 0:
        raise src.refuse(
            "the header length is 0; a safetensors header is a JSON object of at least 2 bytes.",
            value=0,
            limit=2,
        )
    if length > size - 8:
        raise src.refuse(
            f"the first 8 bytes declare a {length}-byte header, but only {size - 8} bytes follow "
            f"(limit {size - 8}): the file is truncated or not a safetensors file (it starts with "
            f"{_head(f)!r}).",
            value=length,
            limit=size - 8,
            fix="download the file again; if it is not safetensors, convert it to safetensors.",
        )
    if length > limits.max_header_bytes:
        raise src.refuse(
            f"the header is {_bytes(length)}, above the limit of {_bytes(limits.max_header_bytes)} "
            "(max_header_bytes); real headers are well under 10 MB.",
            value=length,
            limit=limits.max_header_bytes,
            fix=src.role.raise_limit.format(field="max_header_bytes"),
        )
    raw = _read_exact(f, length, src, hasher)
    if raw[:1] != b"{":
        start = bytes(raw[:40])
        raise src.refuse(
            f"the header must be a JSON object starting with '{{', but it starts with {start!r}.",
            value=start,
        )
    _check_header_counts(src, raw, limits)
    entries = _parse_header_json(src, raw)
    metadata = _check_metadata(src, entries.pop(METADATA_KEY, None), limits)
    if len(entries) > limits.max_tensors:
        raise _too_many_tensors(src, len(entries), limits)
    data_size = size - 8 - length
    tensors = {key: _check_entry(src, key, entries[key], data_size, limits) for key in sorted(entries)}
    _check_layout(src, tensors, data_size)
    return Header(src.path, size, 8 + length, tensors, metadata)


_STRINGS = re.compile(rb'"[^"]*(?:"|\Z)')


def _check_header_counts(src: Source, raw: bytearray, limits: Limits) -> None:
    """Bound what ``json.loads`` will build, before it builds anything.

    Python objects cost 10-60x the JSON bytes they come from (``[[],[],...]``: 3 bytes per 64-byte
    list), so a 100 MB header could take gigabytes. Counting on the raw bytes is C-speed: drop
    escaped backslashes and quotes, and the remaining quotes are exactly the string delimiters
    (for the valid prefix that ``json.loads`` would get through); outside the strings, braces,
    brackets and commas bound the objects, lists and values.
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in raw else raw
    declared = unescaped.count(b'"data_offsets"')
    if declared > limits.max_tensors:
        raise _too_many_tensors(src, declared, limits)
    strings = unescaped.count(b'"') // 2
    # Per tensor: its key, three field names and the dtype; per metadata entry: key and value.
    max_strings = 5 * limits.max_tensors + 2 * limits.max_metadata_entries + 4
    if strings > max_strings:
        raise _header_bomb(src, f"{strings} strings", strings, max_strings, limits)
    # What lies outside the strings, in one C pass (an unclosed last string runs to the end).
    outside = _STRINGS.sub(b"", unescaped)
    objects = outside.count(b"{")
    max_objects = limits.max_tensors + 2
    if objects > max_objects:
        raise _header_bomb(src, f"{objects} JSON objects", objects, max_objects, limits)
    items = outside.count(b",") + outside.count(b"[") + objects
    # Per tensor: a top-level comma, its object and two commas, a shape list with max_dims - 1
    # commas, an offsets list with one comma.
    max_items = limits.max_tensors * (limits.max_dims + 6) + limits.max_metadata_entries + 16
    if items > max_items:
        raise _header_bomb(src, f"{items} JSON values", items, max_items, limits)


def _too_many_tensors(src: Source, count: int, limits: Limits) -> LoomError:
    return src.refuse(
        f"the header declares {count} tensors, above the limit of {limits.max_tensors} (max_tensors); "
        f"{src.role.tensors}.",
        value=count,
        limit=limits.max_tensors,
        fix=src.role.raise_limit.format(field="max_tensors"),
    )


def _header_bomb(src: Source, found: str, value: int, limit: int, limits: Limits) -> LoomError:
    return src.refuse(
        f"the header holds {found}, more than {limit}, the most that {limits.max_tensors} tensors of "
        f"at most {limits.max_dims} dims and {limits.max_metadata_entries} metadata entries need "
        "(max_tensors, max_dims, max_metadata_entries); refused before parsing.",
        value=value,
        limit=limit,
    )


class _DuplicateKey(Exception):
    def __init__(self, key: str, count: int) -> None:
        super().__init__(key)
        self.key = key
        self.count = count


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key, sum(1 for k, _ in pairs if k == key))
            seen.add(key)
    return obj


def _parse_header_json(src: Source, raw: bytearray) -> dict[str, Any]:
    try:
        # Decoded here, strictly: json.loads(bytes) would also accept UTF-16 and UTF-32.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = bytes(raw[e.start : e.end])
        raise src.refuse(
            f"the header is not valid UTF-8: byte {e.start} is {bad!r}.", value=bad
        ) from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_object)
    except _DuplicateKey as e:
        raise src.refuse(
            f"this key appears {e.count} times in the header JSON (limit 1); readers would silently "
            "keep only one of them.",
            key=e.key,
            value=e.count,
            limit=1,
            what="key",
        ) from None
    except json.JSONDecodeError as e:
        near = text[max(0, e.pos - 30) : e.pos + 30]
        raise src.refuse(
            f"the header is not valid JSON: {e.msg} at character {e.pos}, near {near!r}.", value=near
        ) from None
    except RecursionError:
        raise src.refuse(
            "the header nests JSON deeper than the parser allows; a safetensors header nests 3 levels.",
        ) from None
    except ValueError as e:  # e.g. an integer literal of thousands of digits
        raise src.refuse(f"the header is not valid JSON: {e}.") from None
    if not isinstance(obj, dict):
        raise src.refuse(f"the header is a JSON {type(obj).__name__}, not an object.", value=obj)
    return obj


def _check_metadata(src: Source, metadata: Any, limits: Limits) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise src.refuse(
            f"must be an object of string to string, not a {_json_type(metadata)} ({_show(metadata)}).",
            key=METADATA_KEY,
            value=metadata,
            what="key",
        )
    if len(metadata) > limits.max_metadata_entries:
        raise src.refuse(
            f"holds {len(metadata)} entries, above the limit of {limits.max_metadata_entries} "
            "(max_metadata_entries).",
            key=METADATA_KEY,
            value=len(metadata),
            limit=limits.max_metadata_entries,
            what="key",
        )
    total = 0
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise src.refuse(
                f"has a {_json_type(value)} value ({_show(value)}); safetensors metadata values must be "
                "strings.",
                key=key,
                value=value,
                what="metadata key",
            )
        size = len(_utf8(src, value, key, "metadata key"))
        if size > limits.max_metadata_value_bytes:
            raise src.refuse(
                f"has a value of {_bytes(size)}, above the limit of {_bytes(limits.max_metadata_value_bytes)} "
                "(max_metadata_value_bytes).",
                key=key,
                value=size,
                limit=limits.max_metadata_value_bytes,
                what="metadata key",
            )
        total += size + len(_utf8(src, key, key, "metadata key"))
    if total > limits.max_metadata_total_bytes:
        raise src.refuse(
            f"keys and values total {_bytes(total)}, above the limit of "
            f"{_bytes(limits.max_metadata_total_bytes)} (max_metadata_total_bytes).",
            key=METADATA_KEY,
            value=total,
            limit=limits.max_metadata_total_bytes,
            what="key",
        )
    return metadata


def _check_entry(src: Source, key: str, entry: Any, data_size: int, limits: Limits) -> TensorInfo:
    _utf8(src, key, key, "tensor")
    if not isinstance(entry, dict):
        raise src.refuse(
            f"the header entry is a {_json_type(entry)} ({_show(entry)}), not an object with "
            f"{', '.join(_ENTRY_FIELDS)}.",
            key=key,
            value=entry,
        )
    missing = [name for name in _ENTRY_FIELDS if name not in entry]
    extra = sorted(set(entry) - set(_ENTRY_FIELDS))
    if missing or extra:
        raise src.refuse(
            f"the header entry has fields {sorted(entry)}; it needs exactly {list(_ENTRY_FIELDS)} "
            f"(missing {missing}, unknown {extra}).",
            key=key,
            value=sorted(entry),
            limit=list(_ENTRY_FIELDS),
        )
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise src.refuse(
            f"dtype {_show(dtype)} is not supported; supported dtypes: {', '.join(_DTYPES)}.",
            key=key,
            value=dtype,
            limit=list(_DTYPES),
        )
    shape = _check_shape(src, key, entry["shape"], limits)
    begin, end = _check_offsets(src, key, entry["data_offsets"])
    numel = math.prod(shape)
    expected = numel * _DTYPES[dtype][1]
    if end - begin != expected:
        raise src.refuse(
            f"data_offsets [{begin}, {end}] span {end - begin} bytes, but dtype {dtype} with shape "
            f"{list(shape)} needs {expected} bytes.",
            key=key,
            value=end - begin,
            limit=expected,
        )
    if end > data_size:
        raise src.refuse(
            f"data_offsets end at byte {end} of the data section, beyond its end: the file holds only "
            f"{data_size} bytes of tensor data after the header (limit {data_size}). The file is "
            "truncated (an interrupted download?) or its header is wrong.",
            key=key,
            value=end,
            limit=data_size,
            fix="download the file again.",
        )
    return TensorInfo(dtype, shape, (begin, end))


def _check_shape(src: Source, key: str, shape: Any, limits: Limits) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise src.refuse(
            f"shape {_show(shape)} is not a list of non-negative integers.", key=key, value=shape
        )
    if len(shape) > limits.max_dims:
        raise src.refuse(
            f"shape has {len(shape)} dimensions, above the limit of {limits.max_dims} (max_dims).",
            key=key,
            value=len(shape),
            limit=limits.max_dims,
        )
    # Per dimension, so an empty tensor cannot smuggle in a dimension like 2**40 (shape [0, 2**40]).
    for dim in shape:
        if dim > limits.max_dim_size:
            raise src.refuse(
                f"shape {shape} has a dimension of {dim}, above the limit of {limits.max_dim_size} "
                "(max_dim_size).",
                key=key,
                value=dim,
                limit=limits.max_dim_size,
            )
    numel = math.prod(shape)  # Python ints: no overflow, whatever torch's int64 would do
    if numel > limits.max_tensor_elements:
        raise src.refuse(
            f"shape {shape} has {numel} elements, above the limit of {limits.max_tensor_elements} "
            "(max_tensor_elements).",
            key=key,
            value=numel,
            limit=limits.max_tensor_elements,
        )
    return tuple(shape)


def _check_offsets(src: Source, key: str, offsets: Any) -> tuple[int, int]:
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise src.refuse(
            f"data_offsets {_show(offsets)} are not two non-negative integers [begin, end].",
            key=key,
            value=offsets,
        )
    begin, end = offsets
    if begin > end:
        raise src.refuse(
            f"data_offsets [{begin}, {end}] begin after they end.",
            key=key,
            value=offsets,
            limit=end,
        )
    return begin, end


def _check_layout(src: Source, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """The tensors must tile the data section exactly: hidden bytes can carry anything."""
    position, previous = 0, None
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].data_offsets, item[0])):
        begin, end = info.data_offsets
        if begin < position:
            raise src.refuse(
                f"data_offsets [{begin}, {end}] overlap tensor {previous!r}, which ends at {position}.",
                key=key,
                value=begin,
                limit=position,
            )
        if begin > position:
            raise src.refuse(
                f"data_offsets [{begin}, {end}] leave a gap of {begin - position} unused bytes after "
                f"{'tensor ' + repr(previous) if previous else 'the header'}, which ends at {position} "
                f"(limit {position}).",
                key=key,
                value=begin,
                limit=position,
            )
        position, previous = end, key
    if position != data_size:
        raise src.refuse(
            f"{data_size - position} unused bytes follow the last tensor ({previous!r}, ends at {position} "
            f"of {data_size} data bytes; limit 0 unused bytes).",
            value=data_size - position,
            limit=0,
        )


# ------------------------------------------------------------------------------------------ data


def _read_data(f, src: Source, header: Header, hasher) -> dict[str, torch.Tensor]:
    """Read the data section into one buffer the reader owns, checking each slice as it arrives;
    each tensor is a view of its own bytes in it.

    Read with readinto, not memory-mapped. Tensors that view a mapping of the file (safetensors'
    way) would save the copy, but a private mapping still shows later writes to pages it has not
    copied, so a value checked here could change afterwards, and a file truncated by another
    program turns the next touch of a lost page into SIGBUS, which kills the process wherever that
    touch happens (a merge, a sample), with no Python error to catch. Copying out of a mapping has
    the same SIGBUS window during the copy. readinto copies once too, from the page cache into the
    buffer, at memcpy speed; a truncated file is a short read, refused as a changed file, and
    values are checked in the copy nobody else can write.

    One buffer, not one allocation per tensor: a LoRA's ~3,000 tensors then cost one allocation,
    reads of ``HASH_CHUNK_BYTES`` and one value test per slice of a run of same-dtype tensors
    (checked while the slice is still in cache), instead of three calls per tensor. The tensors
    are used together, so they are freed together: the buffer lives while any of them does.
    """
    import torch

    order = sorted(header.tensors.items(), key=lambda item: item[1].data_offsets)
    data = torch.empty(header.size - header.data_start, dtype=torch.uint8)
    view = memoryview(data.numpy())
    loaded = {}
    for run in _same_dtype_runs(order):
        dtype = run[0][1].torch_dtype
        begin, end = run[0][1].data_offsets[0], run[-1][1].data_offsets[1]
        step = max(HASH_CHUNK_BYTES // dtype.itemsize, 1) * dtype.itemsize  # whole elements per slice
        suspect = False
        for position in range(begin, end, step):
            stop = min(position + step, end)
            _read_into(f, view[position:stop], src, hasher)
            suspect = _maybe_bad(data[position:stop], dtype) or suspect
        for key, info in run:
            loaded[key] = _tensor_at(data, info)
            if suspect:  # count and name the refused values tensor by tensor
                _check_values(src, key, loaded[key], data[slice(*info.data_offsets)])
    if f.read(1):
        raise _changed_while_reading(src)
    return {key: loaded[key] for key in header.tensors}


def _same_dtype_runs(order: list[tuple[str, TensorInfo]]) -> list[list[tuple[str, TensorInfo]]]:
    """``order`` (tensors in file order) cut into runs of neighbours with one dtype: each run is one
    contiguous byte range (the layout check made the tensors tile the data section)."""
    runs: list[list[tuple[str, TensorInfo]]] = []
    for item in order:
        if runs and runs[-1][-1][1].dtype == item[1].dtype:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _tensor_at(data: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """The tensor ``info`` declares, viewing its bytes in ``data``; a copy of them for data not
    aligned to its element size (hand-written files), which torch cannot view in place."""
    begin, end = info.data_offsets
    raw = data[begin:end]
    if begin % info.torch_dtype.itemsize:
        raw = raw.clone()
    return raw.view(info.torch_dtype).reshape(info.shape)


def _scan_data(f, src: Source, header: Header, hasher) -> None:
    """Check every tensor's values as ``_read_data`` does, a slice at a time into one reused buffer
    (hashing each slice into ``hasher`` as it goes)."""
    import torch

    buffer = torch.empty(min(_SCAN_SLICE_BYTES, max((i.nbytes for i in header.tensors.values()), default=0)),
                         dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    for key, info in sorted(header.tensors.items(), key=lambda item: item[1].data_offsets):
        itemsize = info.torch_dtype.itemsize
        step = max(len(view) // itemsize, 1) * itemsize  # whole elements per slice
        bad = [0, 0]
        for begin in range(0, info.nbytes, step):
            n = min(step, info.nbytes - begin)
            _read_into(f, view[:n], src, hasher)
            raw = buffer[:n]
            if _maybe_bad(raw, info.torch_dtype):
                bad = [a + b for a, b in zip(bad, _bad_values(raw.view(info.torch_dtype), raw))]
        _refuse_bad_values(src, key, info.torch_dtype, list(info.shape), info.numel, *bad)
    if f.read(1):
        raise _changed_while_reading(src)


def _read_into(f, view: memoryview, src: Source, hasher) -> None:
    position, size = 0, len(view)
    while position < size:
        part = view[position : min(size, position + HASH_CHUNK_BYTES)]
        n = f.readinto(part)
        if not n:
            raise _changed_while_reading(src)
        hasher.update(part[:n])
        position += n


def _check_values(src: Source, key: str, tensor: torch.Tensor, raw: torch.Tensor | None = None) -> None:
    """Finite floats only; booleans stored as 0/1 only (other bytes are undefined behaviour in torch).
    ``raw``: the tensor's bytes as a flat uint8 tensor, when the caller has them."""
    if raw is None:
        import torch

        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    if _maybe_bad(raw, tensor.dtype):
        _refuse_bad_values(src, key, tensor.dtype, list(tensor.shape), tensor.numel(), *_bad_values(tensor, raw))


def _maybe_bad(raw: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the bytes ``raw`` (flat uint8) of a ``dtype`` tensor may hold a refused value: exact
    (False means none) for the formats of ``_tables().nonfinite_bits`` and booleans; True for other float
    formats, which ``_bad_values`` then counts."""
    import torch

    if raw.numel() == 0:
        return False
    if dtype == torch.bool:
        return bool(raw.numpy().max() > 1)
    rule = _tables().nonfinite_bits.get(dtype)
    if rule is None:
        return dtype.is_floating_point or dtype.is_complex
    signed, unsigned, first = rule
    data = raw.numpy()
    sign = 1 << (8 * unsigned(0).itemsize - 1)
    return bool(data.view(signed).max() >= first or data.view(unsigned).max() >= sign | first)


def _bad_values(tensor: torch.Tensor, raw: torch.Tensor | None = None) -> tuple[int, int]:
    """(NaNs, infinities) of a float or complex tensor; (bytes other than 0 or 1, 0) of a bool one.
    The count for a refusal (and the test for formats ``_maybe_bad`` has no bit rule for)."""
    import torch

    if tensor.dtype == torch.bool:
        raw = tensor.reshape(-1).view(torch.uint8) if raw is None else raw
        return int((raw > 1).sum()), 0
    if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex) or tensor.numel() == 0:
        return 0, 0
    nans = infs = 0
    for part in tensor.reshape(-1).split(_FINITE_CHUNK_ELEMENTS):
        if part.is_complex():
            part = torch.view_as_real(part)
        elif part.dtype in _tables().upcast_for_finite:
            part = part.float()
        # aminmax propagates NaN and surfaces +-Inf, and runs 5-70x faster than isfinite().all()
        # on this CPU; counting happens only for a part that holds a refused value.
        low, high = torch.aminmax(part)
        if math.isfinite(low.item()) and math.isfinite(high.item()):
            continue
        nans += int(torch.isnan(part).sum())
        infs += int(torch.isinf(part).sum())
    return nans, infs


def _refuse_bad_values(src: Source, key: str, dtype: torch.dtype, shape: list, numel: int, nans: int,
                       infs: int) -> None:
    if dtype is _tables().dtypes["BOOL"] and nans:
        raise src.refuse(
            f"BOOL tensor holds {nans} bytes other than 0 or 1 out of {numel} (limit 0).",
            key=key,
            value=nans,
            limit=0,
        )
    if nans or infs:
        raise src.refuse(
            f"{_tables().codes[dtype]} tensor of shape {shape} holds {nans + infs} "
            f"non-finite values ({nans} NaN, {infs} infinite) out of {numel} (limit 0).",
            key=key,
            value=nans + infs,
            limit=0,
            fix=src.role.not_finite,
        )


# ---------------------------------------------------------------------------------------- pickle


def _read_pickle(f, src: Source, state, limits: Limits) -> SafeFile:
    import torch

    size = state.size
    hasher = file_hasher()
    buffer = io.BytesIO()
    remaining = size
    while remaining:
        chunk = f.read(min(remaining, HASH_CHUNK_BYTES))
        if not chunk:
            raise _changed_while_reading(src)
        hasher.update(chunk)
        buffer.write(chunk)
        remaining -= len(chunk)
    if f.read(1) or state_of(f) != state:
        raise _changed_while_reading(src)
    buffer.seek(0)
    try:
        loaded = torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusals are UnpicklingError; corrupt zips raise others
        raise src.refuse(
            f"torch.load(weights_only=True) refused the checkpoint: {type(e).__name__}: {_show(str(e))}",
            value=type(e).__name__,
            fix="if it refused a global, the file holds code or objects other than tensors: get a "
            "safetensors version of the LoRA instead.",
        ) from None
    del buffer
    tensors = _check_pickled(src, loaded, limits)
    return SafeFile(src.path, tensors, {}, hasher.hexdigest(), size, "pickle", state)


def _check_pickled(src: Source, loaded: Any, limits: Limits) -> dict[str, torch.Tensor]:
    import torch

    codes = _tables().codes
    if not isinstance(loaded, dict):
        raise src.refuse(
            f"the checkpoint holds a {type(loaded).__name__}, not a dict of tensors.",
            value=type(loaded).__name__,
        )
    if len(loaded) > limits.max_tensors:
        raise _too_many_tensors(src, len(loaded), limits)
    for key, tensor in loaded.items():
        if not isinstance(key, str):
            raise src.refuse(
                f"the checkpoint has a {type(key).__name__} key {_show(key)}; keys must be strings.",
                value=key,
            )
        if not isinstance(tensor, torch.Tensor):
            raise src.refuse(
                f"the value is a {type(tensor).__name__}, not a tensor; a LoRA checkpoint is a flat dict of "
                "tensors (a nested 'state_dict' is not unpacked).",
                key=key,
                value=type(tensor).__name__,
            )
        if tensor.layout != torch.strided or tensor.device.type != "cpu" or tensor.dtype not in codes:
            raise src.refuse(
                f"the tensor is {tensor.layout} {tensor.dtype} on {tensor.device}; supported: dense CPU "
                f"tensors of {', '.join(str(d) for d in codes)}.",
                key=key,
                value=str(tensor.dtype),
                limit=list(_DTYPES),
            )
        _check_shape(src, key, list(tensor.shape), limits)
        _check_values(src, key, tensor)
    # detach: a pickled nn.Parameter would otherwise carry requires_grad into every merge.
    return {key: loaded[key].detach() for key in sorted(loaded)}


# --------------------------------------------------------------------------------------- helpers


class _HashBeside:
    """Hashes, in a worker thread and in order, the buffers a reader hands it, so hashing runs beside
    the reads and value checks instead of after each: hashlib releases the GIL while it hashes a
    buffer over 2 KiB, and readinto and numpy release it too. A buffer must not change once handed
    over (slices of the data buffer, the header's bytes: neither is written again)."""

    def __init__(self, hasher):
        self._hasher = hasher
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loraloom-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._failure is None:
                try:
                    self._hasher.update(data)
                except BaseException as exc:  # re-raised in the reading thread by hexdigest()
                    self._failure = exc

    def update(self, data) -> None:
        self._queue.put(data)

    def abandon(self) -> None:
        """The read failed: end the worker without hashing what is still queued."""
        self._failure = self._failure or RuntimeError("hashing abandoned")
        self.close()

    def close(self) -> None:
        """Let the worker finish what it was handed, and end it."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        if self._failure is not None:
            raise self._failure
        return self._hasher.hexdigest()


@contextmanager
def _hashing_beside(hasher, size: int):
    """``hasher``, or a ``_HashBeside`` around it for a file big enough to pay for a thread; the
    thread ends with the block, also when a check refuses the file half-way."""
    if isinstance(hasher, _KnownDigest) or size < _OVERLAP_MIN_BYTES:
        yield hasher
        return
    beside = _HashBeside(hasher)
    try:
        yield beside
    except BaseException:
        beside.abandon()
        raise
    finally:
        beside.close()


class _KnownDigest:
    """Stands in for the hasher when the caller already knows the file's digest."""

    def __init__(self, digest: str):
        self._digest = digest

    def update(self, _data) -> None:
        pass

    def hexdigest(self) -> str:
        return self._digest


_NO_HASH = _KnownDigest("")  # for reads whose digest nobody asks for (scan_file)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _utf8(src: Source, text: str, key: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # json accepts lone surrogate escapes ("\ud800"); safetensors' Rust parser does not.
        raise src.refuse(
            "contains a lone UTF-16 surrogate escape, which is not valid Unicode.", key=key, what=what
        ) from None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _bytes(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.1f} MiB)"


def _head(f) -> bytes:
    f.seek(0)
    return f.read(16)
