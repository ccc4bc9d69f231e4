"""Merge LoRA values into one new LoRA value (the PeftMerge node's work), with provenance.

`merge_lora_values` turns each LoRA's modules into `merge.Factors`, runs `merge.merge_loras` (peft's
``add_weighted_adapter`` maths, every combination type) and wraps the result as a portable `LoRA`:
float32 factors, alpha = rank, a derived fingerprint, and ``loraloom.*`` metadata saying how it was
made and how far it is from the exact weighted sum.
"""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Callable, Sequence

from .convert import as_lora
from .canonical import COMPONENTS, LoRA, LoRAModule, derived_fingerprint
from .merge import REGISTRY, Factors, MergeOptions, MergeReport, merge_loras


def merge_lora_values(loras: Sequence[LoRA], method: str, weights: Sequence[float],
                      options: MergeOptions = MergeOptions(density=0.5), *,
                      names: Sequence[str] | None = None,
                      check_interrupt: Callable[[], None] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> tuple[LoRA, MergeReport]:
    """Merge ``loras`` with ``method``; returns the new LoRA and the merge report. LoHa/LoKr modules
    are converted to exact LoRA factors first. Options a method does not read are ignored (and
    recorded as `MergeOptions.parameters` says). ``names`` label the sources in the metadata (with
    their fingerprints); by default each file's name."""
    sources = [as_lora(lora) for lora in loras]
    keys = []
    for lora in sources:
        for component, path, _ in lora.modules():
            if (component, path) not in keys:
                keys.append((component, path))
    modules = {}
    for component, path in sorted(keys, key=lambda k: (COMPONENTS.index(k[0]), k[1])):
        factors = []
        for lora in sources:
            m = lora.components.get(component, {}).get(path)
            factors.append(None if m is None else Factors(m.down, m.up, m.scale))
        modules[f"{component}.{path}"] = _common_kernel_form(factors)
    result = merge_loras(method, modules, list(weights), options, check_interrupt=check_interrupt,
                         progress=progress)
    components: dict[str, dict[str, LoRAModule]] = {}
    for key, merged in result.modules.items():
        component, path = key.split(".", 1)
        components.setdefault(component, {})[path] = LoRAModule(merged.down, merged.up, merged.alpha, key=key)
    report = result.report
    # Never the absolute path (a shared merge must not tell where its sources lay, nor whose home
    # that was): the caller's names, else the file name; the fingerprint says which bytes it was.
    names = list(names) if names is not None else [PurePath(lora.path).name if lora.path else lora.fingerprint[:12]
                                                   for lora in loras]
    metadata = {
        "loraloom.merge_method": method,
        "loraloom.merge_parameters": json.dumps({"weights": list(report.weights), **dict(report.parameters)},
                                                sort_keys=True),
        "loraloom.merge_sources": json.dumps([{"name": n, "fingerprint": lora.fingerprint}
                                              for n, lora in zip(names, loras)]),
        "loraloom.merge_report": json.dumps({c: {"modules": r.modules, "rel_error": r.rel_error,
                                                 "median_rel_error": r.median_rel_error,
                                                 "max_rel_error": r.max_rel_error, "energy_kept": r.energy_kept}
                                             for c, r in report.components.items()}, sort_keys=True),
    }
    fingerprint = derived_fingerprint(f"merge:{method}", [lora.fingerprint for lora in loras],
                                      {"weights": list(weights), **options.parameters(REGISTRY[method])})
    merged_lora = LoRA(components, source_format="derived", metadata=metadata, fingerprint=fingerprint,
                       notes=(report.summary(),))
    return merged_lora, report


def _common_kernel_form(factors: list[Factors | None]) -> list[Factors | None]:
    """Give 2-D factors a 1x1 kernel when another source of the module is a conv LoRA.

    A 1x1 conv weight [out, in, 1, 1] and a Linear weight [out, in] are the same maths, but LoHa/LoKr
    converted without a base (`as_lora` above) come out 2-D for a 1x1 conv (SD1.5's proj_in), while
    kohya/LoCon files store that module 4-D: without this, merging the two is refused as "made for
    different models". A real kernel mismatch (3x3 against 2-D) still reaches the driver's shape check.
    """
    if not any(f is not None and f.down.ndim == 4 for f in factors):
        return factors
    return [f if f is None or f.down.ndim == 4 else Factors(f.down[:, :, None, None], f.up[:, :, None, None], f.scale)
            for f in factors]
