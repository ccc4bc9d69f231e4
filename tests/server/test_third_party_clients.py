"""`loraloom serve` driven end to end by a published ComfyUI client library, as its users drive it:
comfy-api-simplified (PyPI; requests + websockets) finds nodes by `_meta.title`, posts the prompt
without a Content-Type, waits on the websocket, reads the history and fetches images via /view.

It is an optional test dependency (the ``test`` extra); without it these tests are skipped."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

simplified = pytest.importorskip("comfy_api_simplified",
                                 reason="the third-party client test needs comfy-api-simplified: "
                                        "pip install 'loraloom[test]'")

from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
START_TIMEOUT = 120  # seconds: the server imports torch and diffusers before it listens


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line ``proc`` prints, or "" when it prints none within ``timeout`` seconds."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0] if got else ""


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """A real ``loraloom serve`` on a free port (``--port 0``), the shipped demo LoRAs in its list."""
    tmp = tmp_path_factory.mktemp("serve")
    proc = subprocess.Popen([sys.executable, "-m", "loraloom.cli", "serve", "--port", "0", "--user-dir",
                             str(tmp / "user"), "--output-dir", str(tmp / "out"), "--lora-dir", str(WORKFLOWS / "loras")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        line = _first_line(proc, START_TIMEOUT)
        assert line.startswith("LoRA Loom editor: http://127.0.0.1:"), f"the server did not start: {line!r}"
        yield line.split(": ", 1)[1].strip().rstrip("/")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("name, size", [("blend", (64, 72)), ("merge_dare", (72, 64))])
def test_queue_wait_on_the_websocket_and_fetch_the_images(server_url, name, size):
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

    api = ComfyApiWrapper(server_url)
    workflow = ComfyWorkflowWrapper(str(WORKFLOWS / f"{name}_api.json"))
    assert {"Load Base Model", "Sample", "Save Image"} <= set(workflow.list_nodes()), "every node has a title"
    workflow.set_node_param("Sample", "steps", 2)
    workflow.set_node_param("Sample", "width", size[0])
    workflow.set_node_param("Sample", "height", size[1])
    workflow.set_node_param("Save Image", "filename_prefix", f"client/{name}")

    images = api.queue_and_wait_images(workflow, "Save Image")  # POST /prompt, /ws, /history, /view

    assert len(images) == 1, images.keys()
    (filename, data), = images.items()
    assert filename.startswith(f"{name}_") and filename.endswith(".png"), filename
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == ("PNG", size)
    (sample,) = [n for n in json.loads(image.text["prompt"]).values() if n["class_type"] == "Sample"]
    assert (sample["inputs"]["steps"], sample["inputs"]["width"], sample["inputs"]["height"]) == (2, *size), \
        "the values the client set by title are the ones that ran"


def test_the_other_calls_of_the_library(server_url):
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper
    from comfy_api_simplified.exceptions import ComfyApiError

    api = ComfyApiWrapper(server_url)
    assert set(api.get_object_info("Sample")) == {"Sample"}
    assert "WeightedBlend" in api.get_object_info()
    assert api.get_system_stats()["system"]["argv"][1] == "serve"
    assert api.get_queue() == {"queue_running": [], "queue_pending": []}
    assert api.get_embeddings() == []
    api.interrupt()  # a POST without a body or a Content-Type
    workflow = ComfyWorkflowWrapper(str(WORKFLOWS / "blend_api.json"))
    workflow.set_node_param("Sample", "width", 130)  # not a multiple of 8: refused when queued
    with pytest.raises(ComfyApiError, match="400"):
        api.queue_prompt(workflow)
