"""SaveImage and PreviewImage: where files may be written."""

import time

import pytest

from loraloom.graph_runtime import ExecutionError, ValidationError


@pytest.mark.parametrize("prefix", ["../escape", "/abs/path", "a\\b"])
def test_save_prefix_outside_output_root_is_refused_before_running(runtime, prefix, sample_wf):
    wf = sample_wf()
    wf["3"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    with pytest.raises(ValidationError) as info:
        runtime.run(wf)
    assert "node 3 (SaveImage) input 'filename_prefix'" in str(info.value), str(info.value)


# --- ComfyUI's filename_prefix variables ---
NOW = time.struct_time((2024, 3, 7, 9, 5, 2, 3, 67, 0))  # 2024-03-07 09:05:02
PROMPT = {
    "5": {"class_type": "KSampler", "inputs": {"seed": 42, "cfg": 7.0, "sampler": "a/b\\c", "model": ["1", 0],
                                               "denoise": 0.5, "flag": True, "none": None},
          "_meta": {"title": "My Sampler"}},
    "6": {"class_type": "KSampler", "inputs": {"seed": 1}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "x"}, "_meta": {"title": "KSampler"}},
}
WORKFLOW = {"nodes": [{"id": 6, "type": "KSampler", "properties": {"Node name for S&R": "Second"}}]}


@pytest.mark.parametrize("prefix, expanded", [
    ("%date:yyyy-MM-dd%", "2024-03-07"),
    ("%date:yy-M-d h:m:s%", "24-3-7 9:5:2"),
    ("%date:hhmmss%", "090502"),
    ("%date:yyy%", "yyy"),  # not a field in ComfyUI's editor either
    ("%date:yyyy.MM.dd%", "2024"),  # the editor formats the text before the first '.' only
    ("%date:yyyy.MM%", "%date:yyyy.MM%"),  # two parts: taken for a node reference, none found
    ("%year%%month%%day%-%hour%%minute%%second%", "20240307-090502"),
    ("img/%width%x%height%", "img/64x32"),
    ("%KSampler.seed%", "42"),  # found by its S&R name (the class type), the first such node
    ("%My Sampler.cfg%", "7"),  # by title; a whole float prints as JavaScript does
    ("%KSampler.denoise%_%My Sampler.flag%", "0.5_true"),
    ("%5.sampler%", "a_b_c"),  # by id; '/' and '\\' become '_'
    ("%Second.seed%", "1"),  # the S&R name set in the editor's workflow
    ("%My Sampler.none%", ""),
    ("%KSampler.model%", "%KSampler.model%"),  # a link, not a widget value
    ("%KSampler.nope%", "%KSampler.nope%"),
    ("%Nobody.seed%", "%Nobody.seed%"),
    ("%foo%_100%", "%foo%_100%"),
    ("%KSampler.seed%%year%", "422024"),
])
def test_prefix_variables_expand_as_comfyui_does(tmp_path, prefix, expanded):
    from loraloom.graph_runtime import Folders
    from loraloom.graph_runtime.context import ExecutionContext, reset_context, use_context
    from loraloom.nodes.common import expand_prefix

    token = use_context(ExecutionContext(folders=Folders.configure(output_dir=tmp_path), prompt=PROMPT,
                                         workflow=WORKFLOW))
    try:
        assert expand_prefix(prefix, width=64, height=32, now=NOW) == expanded
        assert expand_prefix("%width%-%height%", now=NOW) == "0-0", "saves of other things: 0, as in ComfyUI"
    finally:
        reset_context(token)


def test_save_image_expands_the_prefix_with_the_image_size_and_batch_number(runtime, solid_image, tmp_path):
    runtime.register(solid_image)
    wf = {"1": {"class_type": "SolidImage", "inputs": {"level": 9, "batch": 2}},
          "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                      "filename_prefix": "%SolidImage.level%/%year%/%width%x%height%_%batch_num%"}}}
    years = {time.localtime().tm_year}
    refs = runtime.run(wf).outputs["2"]["images"]
    years.add(time.localtime().tm_year)
    assert [(r["subfolder"], r["filename"]) for r in refs] in [
        [(f"9/{y}", "16x16_0_00001_.png"), (f"9/{y}", "16x16_1_00001_.png")] for y in years], refs
    for r in refs:
        assert (tmp_path / "out" / r["subfolder"] / r["filename"]).is_file()


def test_an_expanded_prefix_that_leaves_the_output_folder_is_refused(runtime, solid_image, tmp_path):
    """The raw prefix passes validation; what a widget value makes of it is checked when saving."""
    runtime.register(solid_image)
    wf = {"1": {"class_type": "SolidImage", "inputs": {"label": ".."}},
          "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "%SolidImage.label%/x"}}}
    with pytest.raises(ExecutionError) as info:
        runtime.run(wf)
    assert "'../x_00001_.png'" in str(info.value) and "'..' part" in str(info.value), str(info.value)
    assert not (tmp_path / "x_00001_.png").exists(), "nothing is written beside the output folder"
    assert not list((tmp_path / "out").rglob("*.png"))
