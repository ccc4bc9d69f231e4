"""Bounds on what one workflow may ask for (text length, pixels, nodes), refused at validation with
the way to raise each; text that is not valid Unicode refused at validation, naming node and input;
validation's own work stays linear in the workflow, also when every node fails."""

import json
import random

import networkx as nx
import pytest

from loraloom import Runtime
from loraloom.cli import main
from loraloom.graph_runtime import Limits, ValidationError, WorkflowError
from loraloom.graph_runtime.graph import validate_prompt
from loraloom.graph_runtime.jsonio import loads_strict
from loraloom.graph_runtime.limits import DEFAULT_MAX_TEXT_CHARS


def _sample(**inputs):
    sample = {"model": ["1", 0], "prompt": "a cat", "steps": 1, "width": 64, "height": 64}
    sample.update(inputs)
    return {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-sd15", "dtype": "fp32", "device": "cpu"}},
            "2": {"class_type": "Sample", "inputs": sample},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


@pytest.fixture
def rt(tmp_path, monkeypatch):
    for name in ("LORALOOM_MAX_TEXT_CHARS", "LORALOOM_MAX_PIXELS", "LORALOOM_MAX_NODES"):
        monkeypatch.delenv(name, raising=False)
    return Runtime(lora_dirs=[tmp_path / "loras"], models_dir=tmp_path / "models", output_dir=tmp_path / "out")


def _details(exc: ValidationError) -> list[str]:
    return [e["details"] for entry in exc.node_errors.values() for e in entry["errors"]]


def test_a_10_mb_prompt_is_refused_at_validation_naming_node_input_and_the_fix(rt):
    huge = "cat " * (10 * 2**20 // 4)
    with pytest.raises(ValidationError) as info:
        rt.validate(_sample(prompt=huge, negative_prompt=huge[:DEFAULT_MAX_TEXT_CHARS]))
    details = _details(info.value)
    assert len(details) == 1, f"only the prompt is too long, the negative prompt is at the limit: {details}"
    assert details[0].startswith("node 2 (Sample) input 'prompt': 10485760 characters is above the limit 20000. "
                                 "Fix: "), details[0]
    for way in ("--max-text-chars", "LORALOOM_MAX_TEXT_CHARS", "Runtime(limits=Limits(max_text_chars="):
        assert way in details[0], f"the fix must name {way}: {details[0]}"
    error = info.value.node_errors["2"]["errors"][0]
    info = error["extra_info"]
    assert {k: info[k] for k in ("input_name", "received_length", "max_length")} == \
        {"input_name": "prompt", "received_length": 10485760, "max_length": 20000}
    assert (info["value"], info["limit"], info["kind"]) == (10485760, 20000, "value_too_long"), info
    assert "--max-text-chars" in info["fix"], info


def test_the_text_limit_is_raised_by_argument_or_environment(tmp_path, monkeypatch):
    wf = _sample(prompt="x" * 30_000)
    folders = dict(lora_dirs=[tmp_path], models_dir=tmp_path, output_dir=tmp_path)
    monkeypatch.delenv("LORALOOM_MAX_TEXT_CHARS", raising=False)
    with pytest.raises(ValidationError):
        Runtime(**folders).validate(wf)
    assert Runtime(limits=Limits(max_text_chars=30_000), **folders).validate(wf).outputs == ["3"]
    monkeypatch.setenv("LORALOOM_MAX_TEXT_CHARS", "30_000")
    assert Runtime(**folders).validate(wf).outputs == ["3"]
    with pytest.raises(ValidationError):
        Runtime(limits=Limits(max_text_chars=29_999), **folders).validate(wf)  # an argument beats the environment


@pytest.mark.parametrize("width,height,batch,named", [(8192, 8192, 2, "batch_size"), (4096, 8192, 3, "batch_size")])
def test_too_many_pixels_in_one_sample_are_refused(rt, width, height, batch, named):
    with pytest.raises(ValidationError) as info:
        rt.validate(_sample(width=width, height=height, batch_size=batch))
    (detail,) = _details(info.value)
    pixels = width * height * batch
    assert detail.startswith(f"node 2 (Sample) input '{named}': width x height x batch_size = {width} x {height} x "
                             f"{batch} = {pixels} pixels is above the limit {4096 * 4096 * 4}. Fix: "), detail
    assert "--max-pixels" in detail and "LORALOOM_MAX_PIXELS" in detail
    raised = Runtime(folders=rt.folders, limits=Limits(max_pixels=pixels))
    assert raised.validate(_sample(width=width, height=height, batch_size=batch)).outputs == ["3"]


@pytest.mark.parametrize("width,height,batch", [(8192, 8192, 1), (1024, 1024, 64), (2048, 2048, 16)])
def test_the_default_pixel_limit_allows_real_sizes(rt, width, height, batch):
    assert rt.validate(_sample(width=width, height=height, batch_size=batch)).outputs == ["3"]


def test_too_many_nodes_are_refused_before_each_is_checked(tmp_path):
    wf = _sample()
    for i in range(10, 30):
        wf[str(i)] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    rt = Runtime(lora_dirs=[tmp_path], models_dir=tmp_path, limits=Limits(max_nodes=20))
    with pytest.raises(ValidationError) as info:
        rt.validate(wf)
    assert info.value.error["type"] == "prompt_too_large" and info.value.node_errors == {}
    assert "the workflow has 23 nodes, above the limit 20. Fix: " in str(info.value), str(info.value)
    assert "--max-nodes" in str(info.value)


@pytest.mark.parametrize("text,position", [('\\ud800', 0), ('a cat \\udfff', 6), ('\\udc00\\ud83d', 0)])
def test_a_lone_surrogate_is_refused_at_validation(rt, text, position):
    wf = loads_strict(json.dumps(_sample()).replace('"a cat"', f'"{text}"'))
    with pytest.raises(ValidationError) as info:
        rt.validate(wf)
    (detail,) = _details(info.value)
    code = f"U+{ord(wf['2']['inputs']['prompt'][position]):04X}"
    assert detail.startswith(f"node 2 (Sample) input 'prompt': character {position} is a lone surrogate {code} "), detail
    assert "Fix: " in detail
    detail.encode("utf-8")  # the message itself prints on any terminal: it shows the code, not the character


def test_a_surrogate_pair_is_one_character_and_valid(rt):
    wf = loads_strict(json.dumps(_sample()).replace('"a cat"', '"a cat \\ud83d\\ude00"'))
    assert wf["2"]["inputs"]["prompt"] == "a cat \N{GRINNING FACE}"
    assert rt.validate(wf).nodes["2"]["inputs"]["prompt"] == "a cat \N{GRINNING FACE}"


def test_limits_are_positive_integers(monkeypatch):
    with pytest.raises(WorkflowError, match="max_nodes must be a positive integer, not 0"):
        Limits(max_nodes=0)
    monkeypatch.setenv("LORALOOM_MAX_PIXELS", "lots")
    with pytest.raises(WorkflowError, match="LORALOOM_MAX_PIXELS='lots' is not a whole number"):
        Limits.configure()


def test_cli_flags_raise_the_limits(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORALOOM_MAX_TEXT_CHARS", raising=False)
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(_sample(prompt="x" * 25_000)))
    args = ["validate", str(path), "--lora-dir", str(tmp_path), "--models-dir", str(tmp_path)]
    assert main(args) == 1
    assert "input 'prompt': 25000 characters is above the limit 20000" in capsys.readouterr().err
    assert main(args + ["--max-text-chars", "25000"]) == 0
    with pytest.raises(SystemExit):
        main(args + ["--max-text-chars", "0"])


def test_a_chain_of_invalid_nodes_as_long_as_the_limit_is_reported_whole(stubs):
    """Every node of a 10,000-node chain fails: each error still names the output it blocks (finding
    those per node was quadratic, a minute for this chain)."""
    wf = stubs.chain(10_000)
    for i in range(1, 9_999):
        wf[str(i)]["inputs"]["bogus"] = 1
    with pytest.raises(ValidationError) as info:
        validate_prompt(wf, stubs.registry)
    errors = info.value.node_errors
    assert len(errors) == 9_998 and all(e["dependent_outputs"] == ["9999"] for e in errors.values())


@pytest.mark.parametrize("seed", range(5))
def test_dependent_outputs_are_the_outputs_downstream_even_through_cycles(stubs, seed):
    """The outputs each failing node blocks: itself if an output, and every output among its
    descendants, as networkx finds them, on random graphs with cycles."""
    rng = random.Random(seed)
    n = 40
    wf = {str(i): {"class_type": "Add" if i < 2 else rng.choice(["Show", "Add"]), "inputs": {}} for i in range(n)}
    adds = [k for k, v in wf.items() if v["class_type"] == "Add"]  # the nodes with an output to link from
    for i in range(n):
        src = rng.choice(adds)
        wf[str(i)]["inputs"] = {"x" if wf[str(i)]["class_type"] == "Show" else "a": [src, 0], "bogus": 1}
    with pytest.raises(ValidationError) as info:
        validate_prompt(wf, stubs.registry)
    graph = nx.DiGraph()
    graph.add_nodes_from(wf)
    graph.add_edges_from((v["inputs"].get("x", v["inputs"].get("a"))[0], k) for k, v in wf.items())
    assert not nx.is_directed_acyclic_graph(graph), "each Add is fed by an Add: there is a cycle"
    outputs = {k for k, v in wf.items() if v["class_type"] == "Show"}
    for nid, entry in info.value.node_errors.items():
        expected = sorted(({nid} | nx.descendants(graph, nid)) & outputs)
        assert entry["dependent_outputs"] == expected, nid
