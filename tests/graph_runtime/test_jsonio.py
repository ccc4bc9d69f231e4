"""jsonio.py: strict JSON for workflows from strangers (finite numbers, unique keys, bounded size and
nesting, UTF-8)."""

import pytest

from loraloom.graph_runtime import WorkflowError
from loraloom.graph_runtime.jsonio import check_depth, load_json_file, loads_strict


@pytest.mark.parametrize("text,fragment", [
    ('{"a": NaN}', "NaN is not a finite number"),
    ('{"a": Infinity}', "Infinity is not a finite number"),
    ('{"a": -Infinity}', "-Infinity is not a finite number"),
    ('{"a": 1e999}', "1e999 is not finite"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('[' * 100 + ']' * 100, "nesting depth"),
    ('[' * 100000 + ']' * 100000, "nesting"),
    ('{"a": }', "invalid JSON at line 1 column 7"),
])
def test_strict_json_rejects(text, fragment):
    with pytest.raises(WorkflowError) as info:
        loads_strict(text, source="wf.json")
    assert fragment in str(info.value) and "wf.json" in str(info.value), str(info.value)


def test_size_limit_checked_before_reading(tmp_path):
    path = tmp_path / "big.json"
    path.write_text("[" + "0," * 600 + "0]")
    with pytest.raises(WorkflowError, match="1203 bytes is above the limit of 1000 bytes"):
        load_json_file(path, max_bytes=1000)


def test_bytes_are_decoded_and_parsed():
    assert loads_strict(b'{"a": [1, 2.5, "\xc3\xa9"]}') == {"a": [1, 2.5, "\u00e9"]}


def test_bytes_that_are_not_utf8_name_the_offset():
    with pytest.raises(WorkflowError, match=r"wf.json: not UTF-8 text \(byte 7\)"):
        loads_strict(b'{"a": "\xff"}', source="wf.json")  # 7 bytes before the bad one


def test_text_size_limit():
    assert loads_strict("[1]", max_bytes=3) == [1]
    with pytest.raises(WorkflowError, match="wf: 4 bytes is above the limit of 3 bytes"):
        loads_strict("[12]", source="wf", max_bytes=3)


def test_depth_limit_is_inclusive():
    check_depth({"a": [[1]]}, limit=3)  # dict, list, list: depth 3
    with pytest.raises(WorkflowError, match="x.json: nesting depth 4 is above the limit 3"):
        check_depth({"a": [[[1]]]}, limit=3, source="x.json")
    check_depth(5, limit=0)  # a scalar has no depth


def test_file_missing_or_a_folder(tmp_path):
    with pytest.raises(WorkflowError, match="gone.json: cannot read"):
        load_json_file(tmp_path / "gone.json")
    with pytest.raises(WorkflowError, match="not a regular file"):
        load_json_file(tmp_path)
