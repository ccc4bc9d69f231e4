"""Every node's output is independent of which nodes ran before it in the same Runtime: what one
node sets up for its run (Sample's scheduler) never reaches the pool's base, so SavePipeline writes
the same bytes, and Sample draws the same image, whatever ran first."""

import pytest
import torch

from loraloom import Runtime

SAMPLE = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3}


def base_nodes(runtime):
    """A blended model (node 3) and a LoRA (node 2) for the steps below to use."""
    return {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15", "dtype": "fp32", "device": "cpu"}},
            "2": {"class_type": "LoadLoRA", "inputs": {"lora_name": runtime.names["tiny-sd15/kohya"]}},
            "3": {"class_type": "WeightedBlend", "inputs": {"model": ["1", 0], "lora": ["2", 0], "weight": 0.8}}}


def step_nodes(step: str, i: int) -> dict:
    """Node 10 does `step`; its output goes where `i` says (outputs never overwrite each other)."""
    if step == "save_pipeline":
        return {"10": {"class_type": "SavePipeline", "inputs": {"model": ["3", 0], "filename_prefix": f"p{i}/pipe"}}}
    if step == "save_pipeline_compiled":  # compile options, channels_last: nothing compiles for a save
        return {"9": {"class_type": "Compile", "inputs": {"model": ["3", 0], "mode": "default", "fullgraph": False,
                                                          "dynamic": False, "channels_last": True}},
                "10": {"class_type": "SavePipeline", "inputs": {"model": ["9", 0], "filename_prefix": f"p{i}/pipe"}}}
    if step == "save_lora":
        return {"10": {"class_type": "SaveLoRA", "inputs": {"lora": ["2", 0], "filename_prefix": f"l{i}/lora",
                                                            "format": "kohya", "dtype": "fp32"}}}
    scheduler = step.removeprefix("sample_")
    return {"10": {"class_type": "Sample", "inputs": {"model": ["3", 0], "scheduler": scheduler, **SAMPLE}},
            "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}}


def files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_in_order(runtime, out, order) -> list:
    """Run each step as its own workflow, one after the other, in one Runtime; return their outputs
    (image tensors, or {relative path: bytes} of what the save nodes wrote)."""
    outputs = []
    for i, step in enumerate(order):
        runtime.cache.clear()  # every node really runs again; the model pool stays
        result = runtime.run({**base_nodes(runtime), **step_nodes(step, i)})
        assert "10" in result.executed
        if step.startswith("sample_"):
            outputs.append(result.value("10"))
        else:
            kind = "loras" if step == "save_lora" else "pipelines"
            ref = result.outputs["10"][kind][0]
            written = out / ref["subfolder"] / ref["filename"]
            outputs.append(files(written) if written.is_dir() else {written.name: written.read_bytes()})
    return outputs


ORDERS = [
    ("save_pipeline", "sample_ddim", "save_pipeline", "sample_default", "save_lora", "sample_ddim"),
    ("save_lora", "save_pipeline_compiled", "sample_ddim", "sample_dpm++_2m_karras", "save_pipeline",
     "sample_default"),
    ("sample_dpm++_2m_karras", "sample_default", "save_pipeline", "save_lora", "save_pipeline_compiled",
     "sample_ddim"),
]


def test_every_output_is_the_same_whatever_ran_before(loras_dir, tmp_path):
    root, names = loras_dir
    seen: dict[str, list] = {}
    for n, order in enumerate(ORDERS):
        out = tmp_path / f"out{n}"
        runtime = Runtime(lora_dirs=[root], models_dir=tmp_path / "models", output_dir=out)
        runtime.names = names
        for step, output in zip(order, run_in_order(runtime, out, order)):
            seen.setdefault(step, []).append((order, output))
    for step, outputs in seen.items():
        first_order, first = outputs[0]
        for order, output in outputs[1:]:
            if isinstance(first, torch.Tensor):
                same = torch.equal(first, output)
            else:
                same = first == output
                if not same:  # name the files that differ
                    same = sorted(k for k in first.keys() | output.keys() if first.get(k) != output.get(k))
            assert same is True, f"{step} differs between orders {first_order} and {order}: {same}"
    assert not torch.equal(seen["sample_ddim"][0][1], seen["sample_default"][0][1]), "the schedulers really differ"
    assert seen["save_pipeline_compiled"][0][1] == seen["save_pipeline"][0][1], "compile options never reach a save"


@pytest.mark.parametrize("before", ["sample_ddim", "sample_euler_a"])
def test_save_pipeline_writes_the_base_as_diffusers_does_after_any_sample(runtime, tmp_path, before):
    """SavePipeline of a plain base is what diffusers' save_pretrained writes for that base, byte for
    byte, scheduler config included, even after a Sample chose another scheduler."""
    from loraloom.bases.presets import build_pipeline

    load = {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15", "dtype": "fp32", "device": "cpu"}}}
    scheduler = before.removeprefix("sample_")
    runtime.run({**load, "2": {"class_type": "Sample", "inputs": {"model": ["1", 0], "scheduler": scheduler, **SAMPLE}},
                 "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}})
    result = runtime.run({**load, "2": {"class_type": "SavePipeline",
                                        "inputs": {"model": ["1", 0], "filename_prefix": "plain"}}})
    ref = result.outputs["2"]["pipelines"][0]
    saved = files(tmp_path / "out" / ref["subfolder"] / ref["filename"])
    build_pipeline("tiny-sd15", dtype="fp32", device="cpu").save_pretrained(tmp_path / "reference")
    reference = files(tmp_path / "reference")
    assert sorted(saved) == sorted(reference)
    differ = [k for k in reference if saved[k] != reference[k]]
    assert not differ, f"SavePipeline after {before} differs from save_pretrained in {differ}"
