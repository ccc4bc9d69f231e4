"""`loraloom serve --ray`: a queued sweep runs its cells on Ray actors (a local Ray instance of two
CPUs), which stay up between sweeps with their models loaded."""

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed here (pip install 'loraloom[ray]'); serving sweeps "
                                        "on Ray needs a local Ray cluster")

from loraloom.api import Runtime  # noqa: E402
from loraloom.graph_runtime import load_workflow  # noqa: E402

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "blend_api.json"


async def test_queued_sweeps_run_on_warm_ray_actors(ray_cluster, serve, tmp_path):
    rt = Runtime(output_dir=tmp_path / "output", demo_loras=True)
    prompt = load_workflow(WORKFLOW, rt.registry).prompt
    prompt["5"]["inputs"].update(steps=2, width=64, height=64)
    async with serve(runtime=rt, sweep_executor="ray") as server:
        manifests = []
        for weights in ("0,1", "0.5,0.75"):
            resp = await server.client.post("/api/loraloom/sweep", json={"prompt": prompt,
                                                                         "axes": [f"4.weight={weights}"]})
            queued = await resp.json()
            assert resp.status == 200, queued
            history = await server.wait_done(queued["prompt_id"], timeout=120)
            outputs = history["outputs"]["sweep"]
            assert outputs["failed"] == [] and len(outputs["cells"]) == 2, outputs
            ref = outputs["manifest"][0]
            lines = (rt.folders.output_dir / ref["subfolder"] / ref["filename"]).read_text().splitlines()
            manifests.append([json.loads(line) for line in lines])
    first, second = manifests
    assert {r["worker"] for r in first} <= {"ray-0", "ray-1"}, first
    assert sum(r["loads"] for r in first) >= 1 and sum(r["loads"] for r in second) == 0, (
        "the second sweep found the base loaded: the actors outlive a sweep")
