"""PeftMerge: two to four LoRAs into one new LoRA value, with every add_weighted_adapter method and
the merge methods peft lacks. Its method list, option inputs, tooltips and checks come from the
method and option declarations in `lora.merge_methods`."""

from __future__ import annotations

from ..graph_runtime import Combo, Float, Input, InputError, Int, Link, Output, current_context, node
from ..lora.merge_methods import OPTIONS, PEFT_METHODS, REGISTRY, MergeOptions, users
from ..lora.result_file import LoRAResults
from .common import CATEGORY, LORA, lora_source_name, weight_input

LETTERS = ("a", "b", "c", "d")
FIRST_OPTIONS = ("density", "majority_sign_method", "svd_rank", "svd_clamp", "seed")
"""The options PeftMerge had from the start: required inputs in this order, frozen in saved workflows.
Every option declared later becomes an optional input after the last LoRA, so the widget positions
of saved workflows stay valid."""


def _method_tooltip() -> str:
    others = [n for n in REGISTRY if n not in PEFT_METHODS]
    intro = "peft's combination_type" + (f", and {', '.join(others)} (not in peft)" if others else "")
    return intro + ": " + "; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values())


def _option_input(name: str, optional: bool) -> Input:
    opt = OPTIONS[name]
    widget = opt.widget
    tooltip = opt.meaning + (f"; 0: {opt.none}" if widget.zero_is_none else "") + f". Used by {', '.join(users(name))}"
    if opt.choices:
        return Combo(name, opt.choices, widget.default, tooltip=tooltip, optional=optional)
    if opt.type is int:
        # A merge is reproducible by default: the seed's editor control starts at "fixed" (a changed
        # seed would merge again on every run, and nothing after it would be cached).
        return Int(name, widget.default, min=widget.min, max=widget.max, tooltip=tooltip, optional=optional,
                   control_after_generate="fixed" if name == "seed" else False)
    return Float(name, widget.default, min=widget.min, max=widget.max, step=widget.step, tooltip=tooltip,
                 optional=optional)


def _inputs():
    inputs = []
    for i, letter in enumerate(LETTERS):
        optional = i >= 2
        inputs.append(Link(f"lora_{letter}", LORA, optional=optional))
        inputs.append(weight_input(f"weight_{letter}", optional=optional))
    inputs.append(Combo("method", tuple(REGISTRY), "svd", tooltip=_method_tooltip()))
    inputs += [_option_input(name, optional=False) for name in FIRST_OPTIONS]
    inputs += [_option_input(name, optional=True) for name in OPTIONS if name not in FIRST_OPTIONS]
    return inputs


@node(id="LoraLoomPeftMerge", aliases=("PeftMerge",), category=f"{CATEGORY}/lora",
      display_name="Loom Merge LoRAs (add_weighted_adapter)",
      inputs=_inputs(), outputs=[Output(LORA, "lora")],
      # A merge takes seconds to minutes at real sizes and is pure: kept on disk for the next process.
      persist=LoRAResults(__file__))
class PeftMerge:
    """Merge LoRAs into one portable LoRA with peft's add_weighted_adapter maths, directly on the LoRA
    factors: no PeftModel, no copy of the UNet. Also Model Breadcrumbs (breadcrumbs_svd), which peft
    lacks. Reports the distance from the exact weighted sum."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        method = REGISTRY.get(constants.get("method"))
        if method is None:
            return {}
        found = {}
        for name in method.options:
            if name not in constants:
                continue
            value = OPTIONS[name].from_widget(constants[name])
            problem = OPTIONS[name].problem(value)
            if problem is not None:
                message, fix = problem
                found[name] = InputError(f"{method.name}: {message}" + ("." if fix else ""), value=value,
                                         limit=OPTIONS[name].limit, fix=fix, kind="bad_option")
        return found

    def execute(self, lora_a, weight_a, lora_b, weight_b, method, lora_c=None, weight_c=1.0, lora_d=None,
                weight_d=1.0, **options):
        from ..lora.combine import merge_lora_values

        ctx = current_context()
        pairs = [(lora_a, weight_a), (lora_b, weight_b), (lora_c, weight_c), (lora_d, weight_d)]
        loras = [lo for lo, _ in pairs if lo is not None]
        weights = [w for lo, w in pairs if lo is not None]
        names = [lora_source_name(lo) or lo.fingerprint[:12] for lo in loras]
        merged, report = merge_lora_values(loras, method, weights, MergeOptions.from_widgets(options), names=names,
                                           check_interrupt=ctx.check_interrupt, progress=ctx.progress)
        return {"ui": {"text": [report.summary()]}, "result": (merged,)}
