"""PeftMerge results in the disk cache: a new Runtime (as a new process would) reads the merge back
instead of merging, bit for bit the value computed; a damaged entry is discarded and recomputed; a
changed node or code version misses; the codec stores every module kind exactly."""

import dataclasses

import pytest
import torch

from loraloom import Runtime
from loraloom.lora.readers import read_lora
from loraloom.lora.result_file import LoRAResults
from loraloom.nodes.merge import PeftMerge


def merge_workflow(method="dare_linear", seed=0):
    return {
        "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": "demo-a.safetensors"}},
        "3": {"class_type": "LoadLoRA", "inputs": {"lora_name": "demo-b.safetensors"}},
        "4": {"class_type": "PeftMerge", "inputs": {"lora_a": ["2", 0], "weight_a": 1.0, "lora_b": ["3", 0],
                                                    "weight_b": 0.7, "method": method, "density": 0.5,
                                                    "majority_sign_method": "total", "svd_rank": 4, "svd_clamp": 0.0,
                                                    "seed": seed}},
        "5": {"class_type": "SaveLoRA", "inputs": {"lora": ["4", 0], "filename_prefix": "loras/merged",
                                                   "format": "kohya", "dtype": "fp32"}},
    }


def new_runtime(tmp_path, **kw):
    """A Runtime as a fresh process has it: an empty memory cache, the disk cache in ``tmp_path``."""
    kw.setdefault("disk_cache_bytes", 10**9)
    return Runtime(output_dir=tmp_path / "out", demo_loras=True, disk_cache_dir=tmp_path / "disk", **kw)


def run(rt, workflow):
    events = []
    result = rt.run(workflow, on_event=events.append)
    return result, events


def assert_identical(a, b, notes=True):
    """Same fingerprint, format, metadata, notes (``notes=False``: a merge's note says how long it took);
    every module the same kind, alpha and key, and every tensor the same dtype, shape and bits."""
    assert (a.fingerprint, a.source_format, dict(a.metadata), a.path) == \
        (b.fingerprint, b.source_format, dict(b.metadata), b.path)
    assert not notes or a.notes == b.notes
    assert [(c, p) for c, p, _ in a.modules()] == [(c, p) for c, p, _ in b.modules()]
    for (_, path, m), (_, _, n) in zip(a.modules(), b.modules()):
        assert type(m) is type(n) and (m.alpha, m.key) == (n.alpha, n.key), path
        assert getattr(m, "rows", None) == getattr(n, "rows", None), path
        assert m.tensors().keys() == n.tensors().keys(), path
        for role, t in m.tensors().items():
            u = n.tensors()[role]
            assert t.dtype == u.dtype and t.shape == u.shape, (path, role)
            assert torch.equal(t.view(torch.uint8), u.view(torch.uint8)), f"{path}.{role} differs in its bits"


def entry_files(tmp_path):
    return sorted((tmp_path / "disk").glob("??/*.safetensors"))


def test_a_new_runtime_reads_the_merge_from_disk_bit_for_bit(tmp_path):
    first, _ = run(new_runtime(tmp_path), merge_workflow())
    assert "4" in first.executed and first.disk_cached == []
    assert len(entry_files(tmp_path)) == 1
    second, events = run(new_runtime(tmp_path), merge_workflow())
    assert second.executed == ["5"], "neither the merge nor the LoRA loads it needs ran again"
    assert second.cached == ["4"] and second.disk_cached == ["4"]
    assert {"event": "execution_cached", "nodes": ["4"], "disk": ["4"]}.items() <= events[1].items()
    assert_identical(first.value("4"), second.value("4"))
    # and what a merge without the cache computes
    fresh, _ = run(new_runtime(tmp_path, disk_cache_bytes=0), merge_workflow())
    assert "4" in fresh.executed
    assert_identical(fresh.value("4"), second.value("4"), notes=False)


def test_a_changed_input_misses(tmp_path):
    run(new_runtime(tmp_path), merge_workflow(seed=0))
    other, _ = run(new_runtime(tmp_path), merge_workflow(seed=1))
    assert "4" in other.executed and other.disk_cached == []
    assert len(entry_files(tmp_path)) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip a tensor byte", "flip a metadata byte"])
def test_a_damaged_entry_is_discarded_and_recomputed_never_used(tmp_path, damage):
    first, _ = run(new_runtime(tmp_path), merge_workflow())
    (path,) = entry_files(tmp_path)
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    if damage == "truncate":
        del raw[len(raw) - 1000:]
    elif damage == "flip a tensor byte":
        raw[header_end + (len(raw) - header_end) // 2] ^= 0x01  # a low mantissa bit: still a finite float
    else:
        field = b'alpha\\": '  # inside the manifest, a JSON string in the header
        at = raw.index(field, 0, header_end) + len(field)
        raw[at] = ord("9") if raw[at] != ord("9") else ord("7")  # another alpha, still valid JSON
    path.write_bytes(bytes(raw))
    again, events = run(new_runtime(tmp_path), merge_workflow())
    notes = [e for e in events if e["event"] == "cache_note"]
    assert "4" in again.executed and again.disk_cached == [], "a damaged entry is never used"
    assert len(notes) == 1 and notes[0]["node"] == "4" and "discarded" in notes[0]["message"]
    assert_identical(first.value("4"), again.value("4"), notes=False)
    (rewritten,) = entry_files(tmp_path)
    assert rewritten.read_bytes() != bytes(raw), "the recomputed result replaced it"
    third, _ = run(new_runtime(tmp_path), merge_workflow())
    assert third.disk_cached == ["4"]


def test_a_changed_node_version_or_code_version_misses(tmp_path, monkeypatch):
    run(new_runtime(tmp_path), merge_workflow())
    monkeypatch.setattr(PeftMerge, "SCHEMA", dataclasses.replace(PeftMerge.SCHEMA, version=PeftMerge.SCHEMA.version + 1))
    bumped, _ = run(new_runtime(tmp_path), merge_workflow())
    assert "4" in bumped.executed and bumped.disk_cached == []
    monkeypatch.undo()
    codec = PeftMerge.SCHEMA.persist
    monkeypatch.setattr(codec, "_version", "another merge implementation")
    changed, _ = run(new_runtime(tmp_path), merge_workflow())
    assert "4" in changed.executed and changed.disk_cached == []
    monkeypatch.undo()
    assert run(new_runtime(tmp_path), merge_workflow())[0].disk_cached == ["4"]


def test_the_code_version_hashes_the_merge_code(tmp_path):
    assert LoRAResults(__file__).version() != LoRAResults().version()
    assert LoRAResults().version() == LoRAResults().version()


def test_with_the_disk_cache_off_nothing_is_written(tmp_path):
    result, _ = run(new_runtime(tmp_path, disk_cache_bytes=0), merge_workflow())
    assert "4" in result.executed
    assert not (tmp_path / "disk").exists()


@pytest.mark.parametrize("kind", ["loha", "lokr", "locon", "kohya"])
def test_the_codec_stores_every_module_kind_exactly(tmp_path, lora_files, kind):
    root, names = lora_files
    lora = read_lora(root / names[f"tiny-sd15/{kind}"])
    codec = LoRAResults()
    ui = {"text": ["a report"]}
    assert codec.accepts((lora, lora), ui)
    with open(tmp_path / "entry.safetensors", "wb") as f:
        codec.save((lora, lora), ui, f, {"key": "k"})
    outputs, ui_back, stamp, digest = codec.load(tmp_path / "entry.safetensors")
    assert ui_back == ui and stamp == {"key": "k"} and len(digest) == 64
    for back in outputs:
        assert_identical(lora, back)


def test_the_codec_stores_lokr_row_selections(tmp_path, dit_files):
    # Flux's linear1 LoKr parts select rows of the shared Kronecker product (dit_keys.split_module)
    lora = read_lora(dit_files["tiny-flux/lokr"])
    assert any(m.rows is not None for _, _, m in lora.modules())
    with open(tmp_path / "entry.safetensors", "wb") as f:
        LoRAResults().save((lora,), None, f, {})
    (back,), _, _, _ = LoRAResults().load(tmp_path / "entry.safetensors")
    assert_identical(lora, back)
