"""SaveImage and PreviewImage: where files may be written."""

import pytest

from loraloom.graph_runtime import ValidationError


@pytest.mark.parametrize("prefix", ["../escape", "/abs/path", "a\\b"])
def test_save_prefix_outside_output_root_is_refused_before_running(runtime, prefix, sample_wf):
    wf = sample_wf()
    wf["3"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    with pytest.raises(ValidationError) as info:
        runtime.run(wf)
    assert "node 3 (SaveImage) input 'filename_prefix'" in str(info.value), str(info.value)
