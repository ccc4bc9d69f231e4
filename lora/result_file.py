"""LoRA results as disk cache entries: the codec nodes that output LoRA values declare with
``@node(..., persist=LoRAResults(...))`` (see ``graph_runtime.diskcache``).

An entry is a plain safetensors file: each module's tensors under ``<slot>/<component>/<path>/<field>``
in their own dtype, and in its metadata a manifest of everything else a `LoRA` holds (format,
fingerprint, notes, metadata, each module's kind and alpha), the node's UI output and the store's
stamp. It is read back through safefile's strict reader, as any LoRA file from disk (header, shapes,
dtypes, finite values), which also hashes the bytes it reads for the store's digest check. What comes
back is the value that was stored: same fingerprint, same tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

from .errors import LoRAFormatError

FORMAT = "loraloom-results-1"
"""The layout below; change it whenever the layout changes (it joins every entry's key)."""
MANIFEST_KEY = "loraloom.results"
UI_KEY = "loraloom.ui"
STAMP_PREFIX = "loraloom.cache."
_LORA_PACKAGE = Path(__file__).resolve().parent


class LoRAResults:
    """A disk cache codec for node outputs that are all `LoRA` values, with a JSON UI output.

    ``sources``: the files of the node's own code (``__file__`` of its module). The code version
    hashes them, every module of ``lora/`` (the maths), the layout and torch's version, so an entry
    written by other code is never read: a changed merge gives another key. Importing this module
    imports no torch (declaring a node must stay cheap); its methods do.
    """

    name = "lora-results"
    suffix = ".safetensors"

    def __init__(self, *sources: str):
        self.sources = tuple(Path(s).resolve() for s in sources)
        self._version: str | None = None

    def version(self) -> str:
        """The code version (computed once per process: source files do not change under a run)."""
        if self._version is None:
            import torch

            h = hashlib.sha256(f"{FORMAT}\0torch {torch.__version__}\0".encode())
            for path in sorted(_LORA_PACKAGE.glob("*.py")) + list(self.sources):
                h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
            self._version = h.hexdigest()
        return self._version

    def accepts(self, outputs: tuple, ui: dict | None) -> bool:
        """LoRA values only (CPU tensors, within the strict reader's limits), and a UI output that is
        plain JSON."""
        from .canonical import LoRA
        from .safefile import DEFAULT_LIMITS

        if not outputs or not all(isinstance(v, LoRA) for v in outputs):
            return False
        tensors = [t for lora in outputs for t in lora.__loraloom_parts__()]
        if any(t.device.type != "cpu" for t in tensors):
            return False
        if sum(t.numel() * t.element_size() for t in tensors) > DEFAULT_LIMITS.max_file_bytes // 2:
            return False
        try:
            json.dumps(ui, allow_nan=False)
        except (TypeError, ValueError):
            return False
        return True

    def save(self, outputs: tuple, ui: dict | None, out: BinaryIO, stamp: dict[str, str]) -> None:
        """Write ``outputs`` (LoRA values), ``ui`` and ``stamp`` as a safetensors file into ``out``."""
        import torch

        from .writers import write_safetensors

        tensors: dict[str, torch.Tensor] = {}
        manifest = []
        for slot, lora in enumerate(outputs):
            modules = []
            for component, module_path, module in lora.modules():
                plain = {}
                for f in dataclasses.fields(module):
                    value = getattr(module, f.name)
                    if isinstance(value, torch.Tensor):
                        tensors[f"{slot}/{component}/{module_path}/{f.name}"] = value
                    elif value is not None:
                        plain[f.name] = value
                modules.append([component, module_path, module.kind, plain])
            manifest.append({"source_format": lora.source_format, "metadata": dict(lora.metadata),
                             "fingerprint": lora.fingerprint, "path": lora.path, "notes": list(lora.notes),
                             "modules": modules})
        metadata = {MANIFEST_KEY: json.dumps({"format": FORMAT, "outputs": manifest}, allow_nan=False),
                    UI_KEY: json.dumps(ui, allow_nan=False),
                    **{STAMP_PREFIX + k: v for k, v in stamp.items()}}
        write_safetensors(out, tensors, metadata)

    def load(self, path: Path) -> tuple[tuple, dict | None, dict[str, str], str]:
        """``(outputs, ui, stamp, digest)`` from an entry, read by the strict LoRA reader; raises a
        LoomError for anything it would not trust (the store then discards the entry)."""
        from .canonical import LoHaModule, LoKrModule, LoRA, LoRAModule
        from .safefile import read_lora_file

        kinds = {cls.kind: cls for cls in (LoRAModule, LoHaModule, LoKrModule)}
        safe = read_lora_file(path)
        try:
            manifest = json.loads(safe.metadata[MANIFEST_KEY])
            if manifest.get("format") != FORMAT:
                raise _not_results(path, f"layout {manifest.get('format')!r}, not {FORMAT!r}")
            ui = json.loads(safe.metadata[UI_KEY])
            used = set()
            outputs = []
            for slot, out in enumerate(manifest["outputs"]):
                components: dict[str, dict[str, Any]] = {}
                for component, module_path, kind, plain in out["modules"]:
                    cls = kinds[kind]
                    fields = dict(plain)
                    if "shape_hint" in fields:
                        fields["shape_hint"] = tuple(fields["shape_hint"])
                    if "rows" in fields:  # JSON lists back to the LoKr's row ranges
                        fields["rows"] = tuple(tuple(r) for r in fields["rows"])
                    for f in dataclasses.fields(cls):
                        name = f"{slot}/{component}/{module_path}/{f.name}"
                        if name in safe.tensors:
                            fields[f.name] = safe.tensors[name]
                            used.add(name)
                    components.setdefault(component, {})[module_path] = cls(**fields)
                outputs.append(LoRA(components, out["source_format"], out["metadata"], out["fingerprint"],
                                    out["path"], tuple(out["notes"])))
            if used != set(safe.tensors):
                raise _not_results(path, f"{len(set(safe.tensors) - used)} tensor(s) that no module names")
        except LoRAFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _not_results(path, f"{type(exc).__name__}: {exc}") from exc
        stamp = {k.removeprefix(STAMP_PREFIX): v for k, v in safe.metadata.items() if k.startswith(STAMP_PREFIX)}
        return tuple(outputs), ui, stamp, safe.fingerprint


def _not_results(path: Path, problem: str) -> LoRAFormatError:
    return LoRAFormatError(f"not a LoRA results file of this version: {problem}", path=str(path),
                           kind="bad_results_file")
