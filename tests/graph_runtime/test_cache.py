"""The cache policy module: keys, file fingerprints, size accounting by allocation, eviction."""

import enum
import gc
import hashlib
import os
import sys
import time
import warnings

import pytest

from loraloom.graph_runtime import (CacheStore, Combo, Link, NodeRegistry, Output, Runtime, estimate_nbytes,
                                    file_fingerprint, file_hasher, footprint, node)
from loraloom.graph_runtime import cache


class Blob:
    """An immutable value holding one buffer, as LoRA values hold their tensors."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.asked = 0

    def __loraloom_parts__(self):
        self.asked += 1
        return (self.buffer,)


class Chain:
    """An immutable value holding other values (like a recipe holding LoRA applications)."""

    def __init__(self, parts):
        self.parts = tuple(parts)

    def __loraloom_parts__(self):
        return self.parts


def test_shared_buffer_counts_once_in_one_value_and_across_values():
    shared = bytearray(1000)
    assert estimate_nbytes(Blob(shared)) == 1000
    assert estimate_nbytes(Chain([Blob(shared), Blob(shared)])) == 1000, "one buffer under two values"
    two = Chain([Blob(bytearray(1000)), Blob(bytearray(1000))])
    assert estimate_nbytes(two) == 2000, "two buffers of the same size are two allocations"


def test_store_counts_an_allocation_once_and_frees_it_with_its_last_holder():
    blob, other, big = bytearray(1000), bytearray(600), bytearray(1500)
    one = sys.getsizeof((blob,))  # each entry's own outputs tuple
    store = CacheStore(max_bytes=1000 + 600 + 2 * one)
    store.put("a", (blob,), None)
    store.put("b", (blob,), None)
    assert store.nbytes == 1000 + 2 * one, "two entries holding one buffer count it once"
    assert store.get("a").nbytes == store.get("b").nbytes == 1000 + one, "each entry alone counts it"
    store.get("b")  # b is now the most recently used
    store.put("c", (other,), None)
    assert "a" not in store and "b" in store and "c" in store, "the least recently used entry went"
    assert store.nbytes == 1000 + 600 + 2 * one, "b still holds the shared buffer: its bytes stay counted"
    store.put("d", (big,), None)
    assert list(store._entries) == ["d"], "b and c had to go to fit d"
    assert store.nbytes == 1500 + one, "the shared buffer left the total with its last holder"
    store.put("d", (other,), None)
    assert store.nbytes == 600 + one, "replacing an entry releases what the old one held"


def test_a_result_larger_than_the_budget_is_not_stored_and_evicts_nothing():
    store = CacheStore(max_bytes=2000)
    store.put("small", (bytearray(100),), None)
    assert store.put("huge", (bytearray(5000),), None) is False
    assert "small" in store and "huge" not in store and store.evictions == 0


def test_immutable_values_are_sized_once_for_their_lifetime():
    blob = Blob(bytearray(64))
    for _ in range(3):
        assert estimate_nbytes(Chain([blob])) == 64
    assert blob.asked == 1, "an immutable value's parts are asked for once, then remembered"
    blob_id = id(blob)
    assert blob_id in cache._memo
    del blob
    gc.collect()  # (other tests' garbage may leave the memo too: look for this value only)
    assert blob_id not in cache._memo, "the memo forgets a value when it is freed"


def test_a_chain_of_values_is_sized_with_work_linear_in_its_length():
    """Each step of a chain builds a value holding every earlier step's parts (as WeightedBlend's
    recipes grow); sizing each new step asks only the new values for their parts."""
    shared = Blob(bytearray(4096))
    store = CacheStore()
    start = cache.size_stats.values
    links, n = [], 200
    for i in range(n):
        links.append(Blob(shared.buffer))
        store.put(str(i), (Chain(links),), None)
    assert cache.size_stats.values - start == 2 * n, "one Blob and one Chain sized per step, nothing twice"
    assert store.nbytes < 4096 + 200 * 200 * 8, "the shared buffer is counted once across the 200 entries"
    assert store.nbytes >= 4096


def test_footprint_names_each_allocation():
    data = bytearray(10)
    fp = footprint([data, data])
    assert fp.allocations()[("object", id(data))] == 10
    assert fp.nbytes == 10 + sys.getsizeof([data, data])


class Mode(enum.Enum):
    FAST = 1
    SLOW = 2


runs: list[str] = []


@node(category="test", inputs=[Combo("mode", [Mode.FAST, Mode.SLOW], Mode.FAST)], outputs=[Output("NUMBER")])
class EnumConst:
    def execute(self, mode):
        runs.append(mode.name)
        return (mode.value,)


@node(category="test", inputs=[Link("x", "NUMBER"), Link("y", "NUMBER")], outputs=[], output_node=True)
class ShowPair:
    def execute(self, x, y):
        return {"ui": {"value": [x, y]}}


def test_an_unhashable_constant_warns_once_and_its_node_always_runs():
    cache._warned_unhashable.discard(("EnumConst", "mode"))
    rt = Runtime(registry=NodeRegistry([EnumConst, ShowPair]))
    wf = {"1": {"class_type": "EnumConst", "inputs": {"mode": Mode.SLOW}},
          "2": {"class_type": "EnumConst", "inputs": {"mode": Mode.FAST}},
          "3": {"class_type": "ShowPair", "inputs": {"x": ["1", 0], "y": ["2", 0]}}}
    runs.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = rt.run(wf)
        second = rt.run(wf)
    assert first.executed == second.executed == ["1", "2", "3"], "never a cache hit, never stale"
    assert second.outputs["3"] == {"value": [2, 1]}
    assert runs == ["SLOW", "FAST", "SLOW", "FAST"]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, f"one warning per class and input, got {messages}"
    assert "(EnumConst) input 'mode'" in messages[0] and "Mode.SLOW" in messages[0] and "Fix:" in messages[0]


def test_file_fingerprint_is_the_one_hashing_contract(tmp_path):
    path = tmp_path / "weights.bin"
    data = bytes(range(256)) * 50_000  # more than one read slice
    path.write_bytes(data)
    assert cache.HASH_CHUNK_BYTES < len(data)
    assert file_fingerprint(path) == hashlib.sha256(data).hexdigest()
    h = file_hasher()
    h.update(data[:100])
    h.update(data[100:])
    assert h.hexdigest() == file_fingerprint(path), "the digest does not depend on how the bytes are sliced"
    before = file_fingerprint(tmp_path)
    (tmp_path / "more.bin").write_bytes(b"x")
    assert file_fingerprint(tmp_path) != before, "a folder's fingerprint covers every file in it"


@pytest.mark.parametrize("constants", [{"a": 1, "b": "x"}, {"b": "x", "a": 1}])
def test_node_key_does_not_depend_on_input_order(constants):
    key = cache.node_key("C", 1, constants, {"up": ("k", 0)}, "files")
    assert key == cache.node_key("C", 1, {"a": 1, "b": "x"}, {"up": ("k", 0)}, "files")
    assert key != cache.node_key("C", 2, constants, {"up": ("k", 0)}, "files"), "the version is in the key"


# ------------------------------------------------------------------------- files that change


def _read_text_workflow(name="a.txt"):
    return {"1": {"class_type": "ReadText", "inputs": {"name": name}},
            "2": {"class_type": "ShowText", "inputs": {"text": ["1", 0]}}}


def _text_runtime(stubs, tmp_path, **kw):
    return Runtime(registry=stubs.registry, lora_dirs=[tmp_path], output_dir=tmp_path / "out", **kw)


def test_a_file_changed_while_its_node_runs_is_not_cached_under_the_old_key(stubs, tmp_path):
    """ReadText does not report what it read: a file that changed after the run keyed it leaves its
    result (and its descendants') out of the cache, so putting the old file back never serves it."""
    path = tmp_path / "a.txt"
    path.write_text("old")
    rt = _text_runtime(stubs, tmp_path)

    def swap(event):
        if event["event"] == "executing" and event["node"] == "1":
            path.write_text("new")

    assert rt.run(_read_text_workflow(), on_event=swap).outputs["2"] == {"text": ["new"]}
    path.write_text("old")
    back = rt.run(_read_text_workflow())
    assert back.outputs["2"] == {"text": ["old"]} and back.executed == ["1", "2"], back.outputs


def test_a_same_size_rewrite_with_the_old_mtime_is_seen(stubs, tmp_path, monkeypatch):
    """cp -p and rsync restore the mtime; the ctime in the file's state still changes."""
    monkeypatch.setattr(cache, "RACY_NS", 0)  # remember digests of files written a moment ago, too
    path = tmp_path / "a.txt"
    path.write_text("old")
    rt = _text_runtime(stubs, tmp_path)
    assert rt.run(_read_text_workflow()).outputs["2"] == {"text": ["old"]}
    st = path.stat()
    time.sleep(0.05)  # past the filesystem's timestamp tick
    path.write_text("new")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    again = rt.run(_read_text_workflow())
    assert again.outputs["2"] == {"text": ["new"]} and "1" in again.executed, again.outputs


def test_a_digest_is_not_remembered_for_a_file_changed_a_moment_ago(tmp_path):
    """A same-size write in the same timestamp tick would leave the state unchanged (racy clean)."""
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"x" * 100)
    assert file_fingerprint(path) == hashlib.sha256(b"x" * 100).hexdigest()
    assert cache.known_fingerprint(path) is None, "hashed, but too fresh to vouch for later"


def test_strict_fingerprints_trust_no_remembered_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "RACY_NS", 0)
    path = tmp_path / "w.bin"
    path.write_bytes(b"content")
    digest = file_fingerprint(path)
    known = cache.known_fingerprint(path)
    assert known.digest == digest
    # What a same-tick rewrite that stat cannot see would leave: a remembered digest of other bytes.
    cache._fingerprints[(str(path.resolve()), known.state)] = "0" * 32
    assert file_fingerprint(path) == "0" * 32, "the state vouches for the remembered digest"
    with cache.strict_fingerprints():
        assert file_fingerprint(path) == digest, "strict: the content is hashed"


def test_a_file_input_that_cannot_be_read_names_node_input_and_file(stubs, tmp_path):
    from loraloom.graph_runtime import ExecutionError

    pipe = tmp_path / "pipe.txt"
    os.mkfifo(pipe)
    rt = _text_runtime(stubs, tmp_path)
    with pytest.raises(ExecutionError) as info:
        rt.run(_read_text_workflow("pipe.txt"))  # would block in open() if it were opened
    exc = info.value
    assert (exc.node, exc.class_type, exc.input, exc.kind) == ("1", "ReadText", "name", "not_regular"), exc
    assert str(pipe) in str(exc) and "named pipe" in str(exc), str(exc)
    assert stubs.calls == [], "no node ran"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_input_names_node_input_and_file(stubs, tmp_path):
    from loraloom.graph_runtime import ExecutionError

    path = tmp_path / "a.txt"
    path.write_text("secret")
    path.chmod(0)
    with pytest.raises(ExecutionError) as info:
        _text_runtime(stubs, tmp_path).run(_read_text_workflow())
    assert (info.value.node, info.value.input, info.value.kind) == ("1", "name", "unreadable"), info.value
    assert str(path) in str(info.value) and "Fix:" in str(info.value)
