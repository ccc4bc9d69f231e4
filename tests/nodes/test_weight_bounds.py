"""One bound for every LoRA weight and scale: the same range on every node, enforced by validation."""

import pytest

from loraloom.graph_runtime import ValidationError
from loraloom.nodes import registry
from loraloom.nodes.common import MAX_WEIGHT

WEIGHTS = {
    "LoraLoomWeightedBlend": ("weight", "text_encoder_weight", "weight_2", "weight_3", "weight_4"),
    "LoraLoomPeftMerge": ("weight_a", "weight_b", "weight_c", "weight_d"),
    "LoraLoomFuse": ("lora_scale",),
    "LoraLoomSample": ("lora_scale",),
}


@pytest.mark.parametrize("class_type", sorted(WEIGHTS))
def test_every_weight_and_scale_has_the_one_range(class_type):
    inputs = {inp.name: inp for inp in registry().get(class_type).SCHEMA.inputs}
    for name in WEIGHTS[class_type]:
        inp = inputs[name]
        assert (inp.type, inp.default, inp.min, inp.max) == ("FLOAT", 1.0, -MAX_WEIGHT, MAX_WEIGHT), \
            f"{class_type}.{name}: {inp.min} .. {inp.max}, expected +-{MAX_WEIGHT}"


def test_no_other_float_input_is_a_weight_in_disguise():
    for class_type in registry():
        for inp in registry().get(class_type).SCHEMA.inputs:
            if inp.type == "FLOAT" and ("weight" in inp.name or "scale" in inp.name):
                assert inp.name in WEIGHTS.get(class_type, ()), f"{class_type}.{inp.name} is not in the table above"


def test_a_merge_weight_above_the_bound_is_refused(runtime):
    wf = {
        "1": {"class_type": "LoadLoRA", "inputs": {"lora_name": runtime.names["tiny-sd15/kohya"]}},
        "2": {"class_type": "PeftMerge", "inputs": {"lora_a": ["1", 0], "weight_a": MAX_WEIGHT + 1, "lora_b": ["1", 0],
                                                    "weight_b": 1.0, "method": "cat"}},
        "3": {"class_type": "SaveLoRA", "inputs": {"lora": ["2", 0], "filename_prefix": "m"}},
    }
    with pytest.raises(ValidationError, match=f"node 2 \\(PeftMerge\\) input 'weight_a': {MAX_WEIGHT + 1} is above max {MAX_WEIGHT}"):
        runtime.validate(wf)
