"""`loraloom serve` driven end to end by published ComfyUI client libraries, as their users drive it:

- comfy-api-simplified (requests + websockets) finds nodes by `_meta.title`, posts the prompt without a
  Content-Type, waits on the websocket, reads the history and fetches images via /view;
- comfy-toolkit (urllib + websocket-client, which sends an ``Origin`` with the websocket upgrade)
  tracks the run on the websocket, then polls the history and downloads via /view.

They are optional test dependencies (the ``test`` extra); without one its tests are skipped."""

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
START_TIMEOUT = 120  # seconds: the server imports torch and diffusers before it listens


def needs(*modules: str):
    """Skip the test (before its server starts) when a client library it drives is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"this third-party client test needs {', '.join(missing)}: "
                                                    "pip install 'loraloom[test]'")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """A real ``loraloom serve`` on a free port (``--port 0``), the shipped demo LoRAs in its list."""
    tmp = tmp_path_factory.mktemp("serve")
    proc = subprocess.Popen([sys.executable, "-m", "loraloom.cli", "serve", "--port", "0", "--user-dir",
                             str(tmp / "user"), "--output-dir", str(tmp / "out"), "--lora-dir", str(WORKFLOWS / "loras")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines: list[str] = []
    first = threading.Event()

    def drain():  # read everything it prints, so that a full pipe never blocks it
        for line in proc.stdout:
            lines.append(line)
            first.set()
        first.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        first.wait(START_TIMEOUT)
        assert lines and lines[0].startswith("LoRA Loom editor: http://127.0.0.1:"), f"did not start: {lines}"
        yield lines[0].split(": ", 1)[1].strip().rstrip("/")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(10)
    assert proc.returncode == 0, "".join(lines)


@needs("comfy_api_simplified")
@pytest.mark.parametrize("name, size", [("blend", (64, 72)), ("merge_dare", (72, 64))])
def test_queue_wait_on_the_websocket_and_fetch_the_images(server_url, name, size):
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

    api = ComfyApiWrapper(server_url)
    workflow = ComfyWorkflowWrapper(str(WORKFLOWS / "api" / f"{name}_api.json"))
    assert {"Loom Load Base Model", "Loom Sample", "Save Image"} <= set(workflow.list_nodes()), "every node has a title"
    workflow.set_node_param("Loom Sample", "steps", 2)
    workflow.set_node_param("Loom Sample", "width", size[0])
    workflow.set_node_param("Loom Sample", "height", size[1])
    workflow.set_node_param("Save Image", "filename_prefix", f"client/{name}")

    images = api.queue_and_wait_images(workflow, "Save Image")  # POST /prompt, /ws, /history, /view

    assert len(images) == 1, images.keys()
    (filename, data), = images.items()
    assert filename.startswith(f"{name}_") and filename.endswith(".png"), filename
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == ("PNG", size)
    (sample,) = [n for n in json.loads(image.text["prompt"]).values() if n["class_type"] == "LoraLoomSample"]
    assert (sample["inputs"]["steps"], sample["inputs"]["width"], sample["inputs"]["height"]) == (2, *size), \
        "the values the client set by title are the ones that ran"


@needs("comfy_api_simplified")
def test_the_other_calls_of_comfy_api_simplified(server_url):
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper
    from comfy_api_simplified.exceptions import ComfyApiError

    api = ComfyApiWrapper(server_url)
    assert set(api.get_object_info("Sample")) == {"Sample"}
    assert "WeightedBlend" in api.get_object_info()
    assert api.get_system_stats()["system"]["argv"][1] == "serve"
    assert api.get_queue() == {"queue_running": [], "queue_pending": []}
    assert api.get_embeddings() == []
    api.interrupt()  # a POST without a body or a Content-Type
    workflow = ComfyWorkflowWrapper(str(WORKFLOWS / "api" / "blend_api.json"))
    workflow.set_node_param("Loom Sample", "width", 130)  # not a multiple of 8: refused when queued
    with pytest.raises(ComfyApiError, match="400"):
        api.queue_prompt(workflow)


@needs("comfy_toolkit", "websocket")  # websocket: its "ws" extra, websocket-client
def test_comfy_toolkit_tracks_a_run_over_a_websocket_that_sends_an_origin(server_url):
    import comfy_toolkit

    client = comfy_toolkit.ComfyClient(server_url)
    workflow = client.load_workflow(WORKFLOWS / "api" / "blend_api.json")
    (sample,) = comfy_toolkit.find_nodes_by_title(workflow, "Loom Sample")
    workflow[sample]["inputs"].update(steps=2, width=64, height=64)
    comfy_toolkit.set_filename_prefix(workflow, "toolkit/blend")

    result = client.submit_and_track(workflow)  # POST /prompt, /ws (with Origin), /history

    assert result["status"] == "completed" and len(result["images"]) == 1, result
    image = Image.open(io.BytesIO(client.download(result["images"][0])))
    assert (image.format, image.size) == ("PNG", (64, 64))
