"""Property tests across modules (jsonio, workflow, graph, executor through Runtime, files): malformed
workflow JSON gives only our clear errors, never a crash; so do malformed PNGs that carry a workflow (bad chunks, CRCs,
truncation, inflation bombs); odd files (FIFO, device, symlink to a device, unreadable, huge sparse) as workflows or file inputs give a clear error quickly, never a hang. They map
to no single module on purpose."""

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from loraloom.graph_runtime import LoomError, Runtime

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["Const", "Add", "Show", "Scale", "1", "2"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=20)
link = st.tuples(st.sampled_from(["1", "2", "3", 1, "x"]), st.integers(-2, 3)).map(list)
node = st.fixed_dictionaries({"class_type": st.one_of(st.sampled_from(["Const", "Add", "Scale", "Show", "Nope"]),
                                                      values),
                              "inputs": st.one_of(st.dictionaries(st.sampled_from(["value", "a", "b", "x", "factor",
                                                                                   "zz"]),
                                                                  st.one_of(values, link), max_size=4), values)})
api = st.dictionaries(st.sampled_from(["1", "2", "3", "4"]), st.one_of(node, values), max_size=4)
ui_node = st.fixed_dictionaries({"id": st.one_of(st.integers(0, 5), values), "type": st.one_of(
    st.sampled_from(["Const", "Scale", "Show", "Reroute", "PrimitiveNode"]), values),
    "mode": st.sampled_from([0, 2, 4]), "inputs": st.one_of(st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["x", "a", "factor"]), "link": st.one_of(st.none(), st.integers(0, 5))}),
        max_size=3), values), "widgets_values": st.one_of(st.lists(scalars, max_size=4), values)})
ui = st.fixed_dictionaries({"nodes": st.one_of(st.lists(ui_node, max_size=5), values),
                            "links": st.one_of(st.lists(st.one_of(st.lists(st.one_of(st.integers(0, 5), values),
                                                                           min_size=5, max_size=6), values),
                                                        max_size=5), values)})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(api, ui, values))
def test_malformed_workflows_only_raise_our_errors(stubs, wf):
    rt = Runtime(registry=stubs.registry)
    try:
        rt.run(wf)
    except LoomError as exc:
        assert str(exc), "errors carry a message"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(api, ui, values))
def test_malformed_workflow_files_only_raise_our_errors(stubs, tmp_path, wf):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf, allow_nan=True))
    try:
        Runtime(registry=stubs.registry).validate(path)
    except LoomError:
        pass


# --------------------------------------------------------------------- PNG workflows
# A PNG that carries a workflow comes from strangers too: chunks with bad lengths or CRCs, truncated
# files, text chunks that are malformed or inflate to far more than they weigh.


def _chunk(kind: bytes, data: bytes, crc_ok: bool = True) -> bytes:
    import zlib

    crc = zlib.crc32(kind + data) ^ (0 if crc_ok else 1)
    return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")


def _text_chunk(draw) -> bytes:
    import zlib

    kind = draw(st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"IHDR", b"IDAT", b"IEND", b"xYzW"]))
    key = draw(st.sampled_from([b"prompt", b"workflow", b"other", b"", b"\xff"]))
    text = json.dumps(draw(st.one_of(api, values)), allow_nan=True).encode()
    if draw(st.booleans()):
        text = b"{" * draw(st.integers(0, 2000)) + draw(st.binary(max_size=40))
    packed = zlib.compress(text * draw(st.sampled_from([1, 1, 5000])))  # sometimes a small bomb
    body = {b"tEXt": key + b"\0" + text, b"zTXt": key + b"\0\0" + packed,
            b"iTXt": key + b"\0" + draw(st.sampled_from([b"\0\0", b"\1\0", b"\1", b""])) + b"\0\0" + packed}
    data = body.get(kind, draw(st.binary(max_size=64)))
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return _chunk(kind, data, crc_ok=draw(st.integers(0, 9)) > 0)


@st.composite
def png_files(draw) -> bytes:
    signature = draw(st.sampled_from([b"\x89PNG\r\n\x1a\n"] * 9 + [b"\x89PNG\r\n"]))
    body = b"".join(_text_chunk(draw) for _ in range(draw(st.integers(0, 5))))
    if draw(st.booleans()):
        body += _chunk(b"IEND", b"")
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    return signature + body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(png=png_files())
def test_malformed_png_workflows_only_raise_our_errors(stubs, tmp_path, png):
    path = tmp_path / "wf.png"
    path.write_bytes(png)
    try:
        Runtime(registry=stubs.registry).validate(path)
    except LoomError:
        pass


# --------------------------------------------------------------------- odd files as inputs
# A FIFO blocks open() until a writer comes, a device never ends, a sparse file is huge for free:
# each, given as a workflow or as a file input, must end in one of our errors within seconds.

ODD_KINDS = ["fifo", "dev_zero_link", "device", "device_link", "loop", "unreadable", "huge_sparse"]


def make_odd(path: Path, kind: str, png: bool = False) -> bool:
    """Make ``path`` an odd file of ``kind``; False where this machine cannot."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero_link":
        os.symlink("/dev/zero", path)
    elif kind in ("device", "device_link"):
        target = path if kind == "device" else path.with_name(path.name + ".dev")
        try:
            os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
        except PermissionError:  # making a device node needs privileges
            return False
        if kind == "device_link":
            os.symlink(target.name, path)
    elif kind == "loop":  # unreadable for root too: stat() fails with ELOOP
        os.symlink(path.name + ".b", path)
        os.symlink(path.name, path.with_name(path.name + ".b"))
    elif kind == "unreadable":
        if os.geteuid() == 0:  # root reads files whatever their permissions (the loop kind covers root)
            return False
        path.write_text("{}")
        path.chmod(0)
    else:
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" if png else b"{")
            f.truncate(10 * 2**30)
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(ODD_KINDS), role=st.sampled_from(["workflow.json", "workflow.png", "file input"]))
def test_odd_files_give_a_clear_error_quickly(stubs, ends_quickly, kind, role):
    if role == "file input" and kind == "huge_sparse":
        return  # a huge regular file is a valid input for a node without a size limit (LoadLoRA has one)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rt = Runtime(registry=stubs.registry, lora_dirs=[root], output_dir=root / "out")
        if role == "file input":
            assume(make_odd(root / "odd.txt", kind))
            wf = {"1": {"class_type": "ReadText", "inputs": {"name": "odd.txt"}},
                  "2": {"class_type": "ShowText", "inputs": {"text": ["1", 0]}}}
            exc = ends_quickly(lambda: rt.run(wf))
            assert stubs.calls == [], "the node never ran on an odd file"
        else:
            path = root / f"odd{Path(role).suffix}"
            assume(make_odd(path, kind, png=role.endswith(".png")))
            exc = ends_quickly(lambda: rt.run(path))
            assert str(path) in str(exc), str(exc)
        assert isinstance(exc, LoomError) and "odd" in str(exc), repr(exc)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraloom.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_cli_refuses_a_fifo_workflow_without_hanging(tmp_path):
    path = tmp_path / "wf.json"
    os.mkfifo(path)
    done = _cli("run", str(path), "--no-progress")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(path) in done.stderr and "named pipe" in done.stderr, done.stderr


@pytest.mark.parametrize("kind", ["fifo", "device_link", "huge_sparse"])
def test_cli_refuses_an_odd_lora_without_hanging(tmp_path, kind):
    loras = tmp_path / "loras"
    loras.mkdir()
    if not make_odd(loras / "odd.safetensors", kind):
        pytest.skip(f"this machine cannot make a {kind}")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": "odd.safetensors"}},
                              "2": {"class_type": "SaveLoRA", "inputs": {"lora": ["1", 0]}}}))
    done = _cli("run", str(wf), "--no-progress", "--lora-dir", str(loras), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "odd.safetensors" in done.stderr and "node 1 (LoadLoRA) input 'lora_name'" in done.stderr, done.stderr


def test_cli_refuses_a_huge_workflow_named_like_a_shipped_one(tmp_path):
    shipped = sorted(p.name for p in (Path(__file__).parents[2] / "workflows").glob("*.json"))[0]
    path = tmp_path / shipped
    assert make_odd(path, "huge_sparse")
    done = _cli("run", str(path), "--no-progress", timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(path) in done.stderr and "above the limit" in done.stderr, done.stderr


# --------------------------------------------------------------------- PNG: the cases


def _png_with(chunk: bytes) -> bytes:
    ihdr = _chunk(b"IHDR", (1).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0]))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk + _chunk(b"IEND", b"")


def test_a_100_mib_itxt_bomb_in_102_kb_is_refused_without_inflating_it(stubs, tmp_path):
    import tracemalloc
    import zlib

    from loraloom.graph_runtime.jsonio import MAX_WORKFLOW_BYTES

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with(_chunk(b"iTXt", b"workflow\0\1\0\0\0" + zlib.compress(b" " * 100 * 2**20, 9))))
    assert path.stat().st_size < 110_000, path.stat().st_size
    tracemalloc.start()
    try:
        with pytest.raises(LoomError, match="inflates to more than") as info:
            Runtime(registry=stubs.registry).validate(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert peak < MAX_WORKFLOW_BYTES + 2**24, f"inflated {peak} bytes for a limit of {MAX_WORKFLOW_BYTES}"


WORKFLOW = json.dumps({"1": {"class_type": "Const", "inputs": {"value": 1}},
                       "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}}}).encode()


def _cut_stream() -> bytes:
    import zlib

    packed = zlib.compress(WORKFLOW + b" " * 100_000)
    for cut in range(len(packed) - 1, 0, -1):  # the shortest prefix that still inflates the whole workflow
        if not zlib.decompressobj().decompress(packed[:cut]).startswith(WORKFLOW):
            return packed[: cut + 1]
    raise AssertionError("no cut found")


MALFORMED_ITXT = {
    "nothing after the keyword": b"prompt\0",
    "compression flag 2": b"prompt\0\2\0\0\0" + WORKFLOW,
    "compression method 1": b"prompt\0\1\1\0\0" + WORKFLOW,
    "no language tag or translated keyword": b"prompt\0\0\0" + WORKFLOW,
    "compressed text cut short": b"prompt\0\1\0\0\0" + _cut_stream(),
    "not zlib": b"prompt\0\1\0\0\0" + WORKFLOW,
    "not UTF-8": b"prompt\0\0\0\0\0\xff" + WORKFLOW,
}


@pytest.mark.parametrize("case", list(MALFORMED_ITXT))
def test_malformed_itxt_is_refused_naming_the_file(stubs, tmp_path, case):
    path = tmp_path / "wf.png"
    path.write_bytes(_png_with(_chunk(b"iTXt", MALFORMED_ITXT[case])))
    with pytest.raises(LoomError) as info:
        Runtime(registry=stubs.registry).validate(path)
    assert str(path) in str(info.value) and "iTXt" in str(info.value), f"{case}: {info.value}"


def test_well_formed_itxt_still_loads(stubs, tmp_path):
    import zlib

    for body in (b"prompt\0\0\0en\0Prompt\0" + WORKFLOW, b"prompt\0\1\0\0\0" + zlib.compress(WORKFLOW)):
        path = tmp_path / "wf.png"
        path.write_bytes(_png_with(_chunk(b"iTXt", body)))
        assert Runtime(registry=stubs.registry).validate(path).outputs == ["2"]
