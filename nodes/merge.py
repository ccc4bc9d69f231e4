"""PeftMerge: two to four LoRAs into one new LoRA value, with every add_weighted_adapter method."""

from __future__ import annotations

from ..graph_runtime import Combo, Float, Int, Link, Output, current_context, node
from .common import CATEGORY, LORA, weight_input

LETTERS = ("a", "b", "c", "d")
METHOD_NAMES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")  # peft's names; frozen in workflows


def _inputs():
    inputs = []
    for i, letter in enumerate(LETTERS):
        optional = i >= 2
        inputs.append(Link(f"lora_{letter}", LORA, optional=optional))
        inputs.append(weight_input(f"weight_{letter}", optional=optional))
    return inputs + [
        Combo("method", METHOD_NAMES, "svd", tooltip="peft's combination_type: cat is exact; svd the best rank-k; "
              "the others combine A's and B's (or prune full deltas, for _svd) as peft does"),
        Float("density", 0.5, min=0.0, max=1.0, step=0.05, tooltip="ties, dare and magnitude_prune: fraction kept"),
        Combo("majority_sign_method", ["total", "frequency"], "total"),
        Int("svd_rank", 0, min=0, max=4096, tooltip="_svd forms: rank of the result; 0: the largest source rank"),
        Float("svd_clamp", 0.0, min=0.0, max=1.0, step=0.01, tooltip="_svd forms: clamp factors at this quantile; "
              "0: no clamp"),
        Int("seed", 0, min=0, max=2**63 - 1, tooltip="DARE's random pruning: same seed, same result, whatever ran "
            "before", control_after_generate=False),
    ]


@node(category=f"{CATEGORY}/lora", display_name="Merge LoRAs (add_weighted_adapter)",
      inputs=_inputs(), outputs=[Output(LORA, "lora")])
class PeftMerge:
    """Merge LoRAs into one portable LoRA with peft's add_weighted_adapter maths, directly on the LoRA
    factors: no PeftModel, no copy of the UNet. Reports the distance from the exact weighted sum."""

    @classmethod
    def check_inputs(cls, constants: dict) -> dict:
        from ..lora.merge import DENSITY_METHODS

        if constants.get("method") in DENSITY_METHODS and constants.get("density") == 0:
            return {"density": f"0 keeps nothing; {constants['method']} needs a density in (0, 1]"}
        return {}

    def execute(self, lora_a, weight_a, lora_b, weight_b, method, density, majority_sign_method, svd_rank,
                svd_clamp, seed, lora_c=None, weight_c=1.0, lora_d=None, weight_d=1.0):
        from ..lora.combine import merge_lora_values

        ctx = current_context()
        pairs = [(lora_a, weight_a), (lora_b, weight_b), (lora_c, weight_c), (lora_d, weight_d)]
        loras = [lo for lo, _ in pairs if lo is not None]
        weights = [w for lo, w in pairs if lo is not None]
        merged, report = merge_lora_values(loras, method, weights, density=density,
                                           majority_sign_method=majority_sign_method, svd_rank=svd_rank or None,
                                           svd_clamp=svd_clamp or None, seed=seed,
                                           check_interrupt=ctx.check_interrupt, progress=ctx.progress)
        return {"ui": {"text": [report.summary()]}, "result": (merged,)}
