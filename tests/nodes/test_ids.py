"""Node ids and display names: ids that cannot collide with another pack's (the LoraLoom prefix),
display names that no core ComfyUI node has (the "Loom " prefix), and every earlier id kept as an
alias. Reads nothing from ComfyUI: tests/comfyui/test_ids.py checks the same inside real ComfyUI."""

import loraloom
from loraloom.nodes import BUILTIN, registry

# The ids of the releases before the rename: workflows saved with them must keep loading.
OLD_IDS = {"LoadBase", "LoadLoRA", "WeightedBlend", "PeftMerge", "Fuse", "Compile", "Sample", "SaveLoRA",
           "SavePipeline", "SaveCheckpoint", "SweepGrid"}
# Our headless stand-ins for ComfyUI's own nodes keep ComfyUI's ids (a ComfyUI workflow runs unchanged).
STAND_INS = {"SaveImage", "PreviewImage"}


def test_every_exported_node_has_a_prefixed_id_and_display_name():
    for cls in BUILTIN:
        schema = cls.SCHEMA
        if schema.id in STAND_INS:
            assert not schema.comfy_export, f"{schema.id} is ComfyUI's own: ComfyUI must keep its node"
            continue
        assert schema.id == "LoraLoom" + cls.__name__, f"{schema.id}: ids are LoraLoom + the class name"
        assert schema.display_name.startswith("Loom "), f"{schema.id}: {schema.display_name!r}"
        assert schema.aliases == (cls.__name__,), f"{schema.id} keeps its old id {cls.__name__} as an alias"


def test_every_old_id_is_an_alias_of_its_renamed_node():
    reg = registry()
    assert set(reg.aliases()) == OLD_IDS
    for old in OLD_IDS:
        assert reg.canonical(old) == "LoraLoom" + old and reg.get(old) is reg.get("LoraLoom" + old)


def test_comfyui_mappings_hold_new_ids_and_old_ids_as_deprecated_with_distinct_names():
    classes, names = loraloom.NODE_CLASS_MAPPINGS, loraloom.NODE_DISPLAY_NAME_MAPPINGS
    assert set(classes) == set(names), "a display name for exactly our classes (ComfyUI applies every one)"
    assert not STAND_INS & set(classes), "ComfyUI's own SaveImage / PreviewImage stay ComfyUI's"
    new = {k for k in classes if k.startswith("LoraLoom")}
    assert new | OLD_IDS | {"SweepGridCells"} == set(classes)
    assert {"LoraLoomSweepGridCells", "LoraLoomSweepGrid"} <= new
    for key, cls in classes.items():
        old = key in OLD_IDS or key == "SweepGridCells"
        assert getattr(cls, "DEPRECATED", False) is old, f"{key}: deprecated exactly when it is an old id"
        assert names[key].startswith("Loom "), f"{key}: {names[key]!r}"
        if old:
            assert classes["LoraLoom" + key] in cls.__mro__, f"{key} is the renamed node itself"
            assert names[key] == f"{names['LoraLoom' + key]} [old id {key}]"
    assert len(set(names.values())) == len(names), "no two of our entries share a display name"
