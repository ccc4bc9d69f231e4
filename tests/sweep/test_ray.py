"""RayExecutor on a local Ray cluster (2 CPUs, two worker actors): routing by affinity, results
bit-identical to a local run, an actor killed mid-sweep losing nothing, and files shipped to a worker
whose folders do not hold them."""

import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed here (pip install 'loraloom[ray]'); the Ray "
                                        "executor's tests need a local Ray cluster")

from loraloom.api import Runtime  # noqa: E402
from loraloom.graph_runtime import Interrupted, load_workflow  # noqa: E402
from loraloom.graph_runtime.paths import Folders  # noqa: E402
from loraloom.sweep.cell import Cell, image_sources  # noqa: E402
from loraloom.sweep.executor import LocalExecutor, SweepJob  # noqa: E402
from loraloom.sweep.ray_executor import SHIPPED, RayExecutor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "workflows" / "api" / "blend_api.json"


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return Runtime(output_dir=tmp_path_factory.mktemp("out"), demo_loras=True)


@pytest.fixture(scope="module")
def shared(ray_cluster, rt, tmp_path_factory):
    """Two actors kept across tests (one job: they stay warm); steal=False where a test asks."""
    ex = RayExecutor(workers=2, threads=1, cache_dir=str(tmp_path_factory.mktemp("worker-cache")))
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def local():
    """The reference: cells run in this process on one runtime, one torch thread (as the actors run)."""
    ex = LocalExecutor()

    def run(cells, job):
        ex.runtime = ex.runtime if ex.runtime is not None and ex.runtime.folders == job.folders else None
        return {r.index: r for r in ex.run(cells, job)}

    return run


def grid(rt, weights, affinities, source="tiny-sdxl"):
    """Cells of blend_api.json (tiny-sdxl, 64 px, 2 steps) over LoRA A's weight, with given affinities."""
    prompt = load_workflow(WORKFLOW, rt.registry).prompt
    prompt["5"]["inputs"].update(steps=2, width=64, height=64)
    prompt["1"]["inputs"]["source"] = source
    cells = []
    for i, (weight, affinity) in enumerate(zip(weights, affinities)):
        cell_prompt = {nid: {**node, "inputs": dict(node["inputs"])} for nid, node in prompt.items()}
        cell_prompt["4"]["inputs"]["weight"] = weight
        cells.append(Cell(i, (i,), {"4.weight": weight}, cell_prompt, image_sources(cell_prompt), affinity=affinity))
    return cells


def assert_identical(results, reference):
    assert sorted(results) == sorted(reference), "every cell has one result"
    for index, result in results.items():
        assert result.ok, result.error
        for node, images in reference[index].images.items():
            assert all(np.array_equal(a, b) for a, b in zip(result.images[node], images, strict=True)), (
                f"cell {index}: the Ray worker's image differs from the local run's")


def test_affinities_stick_to_one_actor_and_results_equal_a_local_run(shared, rt, local):
    cells = grid(rt, [0.0, 0.5, 1.0, 1.5], ["a", "a", "b", "b"])
    job = SweepJob.from_runtime(rt)
    shared.steal = False
    results = {r.index: r for r in shared.run(cells, job)}
    by_affinity = {}
    for cell in cells:
        by_affinity.setdefault(cell.affinity, set()).add(results[cell.index].worker)
    assert all(len(workers) == 1 for workers in by_affinity.values()), f"an affinity ran on two actors: {by_affinity}"
    assert by_affinity["a"] != by_affinity["b"], "two affinities use both actors"
    assert_identical(results, local(cells, job))
    assert not list((rt.folders.output_dir).rglob("*.png")), "the workers write no output file"


def test_one_affinity_is_shared_when_an_actor_runs_dry(shared, rt):
    cells = grid(rt, [0.0, 0.25, 0.5, 0.75], ["c"] * 4)
    shared.steal = True
    workers = {r.worker for r in shared.run(cells, SweepJob.from_runtime(rt))}
    assert len(workers) == 2, f"the idle actor took half the queue: {workers}"


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_killed_actor_loses_no_cell(shared, rt, local, how):
    cells = grid(rt, [0.0, 0.2, 0.4, 0.6, 0.8], [how] * 5)
    job = SweepJob.from_runtime(rt)
    ex = shared
    ex.steal = False
    results, killed = {}, None
    for result in ex.run(cells, job):
        assert result.index not in results, "no cell is reported twice"
        results[result.index] = result
        if killed is None:
            killed = result.worker
            if how == "ray.kill":
                ray.kill(ex.actor(killed), no_restart=True)
            else:
                info = ex.actor(killed).ready.options(concurrency_group="control").remote()
                os.kill(ray.get(info)["pid"], signal.SIGKILL)
    after = [r for r in results.values() if r.worker != killed]
    assert after, f"the cells left when {killed} died ran elsewhere"
    assert all(r.worker != killed for r in results.values() if r.index > 1), (
        f"nothing after the cell in flight ran on the dead actor: {[(r.index, r.worker) for r in results.values()]}")
    assert_identical(results, local(cells, job))


def test_an_interrupt_keeps_the_finished_cells_and_starts_no_other(shared, rt):
    cells = grid(rt, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], ["interrupt"] * 6)
    flag = threading.Event()  # what the CLI's Ctrl-C sets: the driver runtime's interrupt_flag
    shared.steal, shared.interrupt_flag = False, flag
    got = []
    try:
        with pytest.raises(Interrupted):
            for result in shared.run(cells, SweepJob.from_runtime(rt)):
                assert result.ok, result.error
                got.append(result.index)
                flag.set()
    finally:
        shared.interrupt_flag = None
    assert 1 <= len(got) <= 2, f"the cell in flight may finish, no queued cell starts: {got}"


def test_runtime_sweep_on_ray_writes_the_local_sweeps_files(shared, rt, tmp_path):
    """Runtime.sweep(executor="ray") end to end: the driver writes the same cell PNGs and grid, byte
    for byte, as a local sweep, and the manifest names the actors."""
    shared.close_actors()  # Runtime.sweep starts its own two actors on the cluster's two CPUs
    workflow = load_workflow(WORKFLOW, rt.registry).prompt
    workflow["5"]["inputs"].update(steps=2, width=64, height=64)
    axes = {"4.weight": [0.0, 1.0], "4.weight_2": [0.0, 1.0]}
    on_ray = rt.sweep(workflow, axes, executor="ray", out=tmp_path / "ray")
    local = rt.sweep(workflow, axes, out=tmp_path / "local")
    assert not on_ray.failed and sorted(on_ray.records) == [0, 1, 2, 3]
    assert {r.worker for r in on_ray.records.values()} <= {"ray-0", "ray-1"}, on_ray.records
    written = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.png"))
    assert written and written == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*.png"))
    for name in written:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_cli_ray_flag_selects_the_ray_executor():
    from loraloom.cli import _sweep_executor, build_parser

    parse = build_parser().parse_args
    assert _sweep_executor(parse(["sweep", "wf.json", "--ray"])) == ("ray", None), "bare --ray: a local instance"
    assert _sweep_executor(parse(["sweep", "wf.json", "--ray", "auto"])) == ("ray", "auto")
    assert _sweep_executor(parse(["sweep", "wf.json"])) == ("local", None)


def test_files_reach_a_worker_whose_folders_lack_them(shared, local, tmp_path):
    """The LoRA files and a base saved as a diffusers folder are only in the driver's folders: the
    workers get them through the object store, once per content, and render the same images."""
    from loraloom.bases.presets import build_pipeline

    driver_loras, driver_models = tmp_path / "driver-loras", tmp_path / "driver-models"
    driver_loras.mkdir()
    for name in ("demo-a.safetensors", "demo-b.safetensors"):
        shutil.copy(REPO / "workflows" / "loras" / name, driver_loras / name)
    build_pipeline("tiny-sdxl", dtype="fp32", device="cpu").save_pretrained(driver_models / "tiny-folder")
    driver = Runtime(lora_dirs=[driver_loras], models_dir=driver_models, output_dir=tmp_path / "out")
    elsewhere = Folders([tmp_path / "worker-loras"], tmp_path / "worker-models", tmp_path / "worker-out")
    cells = grid(driver, [0.0, 1.0], ["a", "b"], source="tiny-folder")
    job = SweepJob.from_runtime(driver)
    shared.close_actors()  # the cluster's two CPUs go to two actors that see other folders
    ex = RayExecutor(workers=2, threads=1, cache_dir=str(tmp_path / "worker-cache"), worker_folders=elsewhere,
                     steal=False)
    try:
        results = {r.index: r for r in ex.run(cells, job)}
    finally:
        ex.close()
    assert_identical(results, local(cells, job))
    cache = tmp_path / "worker-cache"
    shipped = sorted(p.name for p in (cache / "loras" / SHIPPED).rglob("*.safetensors"))
    assert shipped == ["demo-a.safetensors", "demo-b.safetensors"], f"one copy per content: {shipped}"
    (base,) = (cache / "models" / SHIPPED).glob("*/tiny-folder")
    assert (base / "model_index.json").is_file() and (base / "unet").is_dir(), "the base folder, whole"
    assert not (tmp_path / "worker-loras").exists() and not (tmp_path / "worker-models").exists(), (
        "the worker's own folders are left alone")


def test_more_workers_than_the_cluster_has_room_for_is_an_error_not_a_hang(shared, rt, monkeypatch):
    from loraloom.graph_runtime import LoomError
    from loraloom.sweep import ray_executor

    shared.close_actors()
    monkeypatch.setattr(ray_executor, "START_TIMEOUT", 5.0)
    ex = RayExecutor(workers=3, threads=1)  # one CPU each, on a cluster of two
    with pytest.raises(LoomError) as info:
        ex.start(SweepJob.from_runtime(rt))
    # how many of the two that fit started within 5 s depends on the machine's load; the third never can
    assert info.value.kind == "ray_workers_pending" and "of 3 Ray workers started" in str(info.value), str(info.value)
    assert not ex.slots, "the workers that did start are ended"


def test_cli_sweep_ray_starts_its_own_local_instance(tmp_path):
    """`loraloom sweep ... --ray` in a fresh process: it starts a Ray instance (whose workers import this
    checkout through the inherited environment), writes the sweep and says nothing of Ray."""
    import json
    import subprocess
    import sys

    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "loraloom.cli", "sweep", str(WORKFLOW), "--set", "5.steps=2",
                           "--set", "5.width=64", "--set", "5.height=64", "--axis", "4.weight=0,1", "--ray",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ray" not in proc.stderr.lower(), f"Ray's own notices reached the user: {proc.stderr}"
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1] and {r["worker"][:4] for r in records} == {"ray-"}
