"""The pack inside real ComfyUI.

Every test in this folder runs only when LORALOOM_COMFYUI names a ComfyUI folder (the one holding
main.py; `.ci/run` sets it up from the ComfyUI source it is given); otherwise each is skipped with that
reason. ComfyUI's Python is LORALOOM_COMFYUI_PYTHON, else <folder>/../venv/bin/python where that exists
(the layout of a ComfyUI set up for these tests), else this interpreter. The pack must be importable by
it: that Python needs our dependencies.

Fixtures: ``comfyui`` (one ComfyUI server for the session, started with its own base folder:
custom_nodes with our pack linked in, models with our LoRA fixtures) and ``prompts`` (builders of
prompt entries for our nodes and ComfyUI's own).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFYUI = os.environ.get("LORALOOM_COMFYUI")
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if COMFYUI:
        return
    skip = pytest.mark.skip(reason="set LORALOOM_COMFYUI to a ComfyUI folder (with main.py) to run the pack "
                                   "inside real ComfyUI")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def comfyui_python(folder: Path) -> str:
    """The Python that runs ComfyUI in ``folder``."""
    if os.environ.get("LORALOOM_COMFYUI_PYTHON"):
        return os.environ["LORALOOM_COMFYUI_PYTHON"]
    venv = folder.parent / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class ComfyUI:
    """A ComfyUI server started for the tests, spoken to over its HTTP API."""

    def __init__(self, url: str, log: Path, base: Path, names: dict):
        self.url, self.log, self.base, self.names = url, log, base, names

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def combo_options(self, node_id: str, name: str) -> list:
        """The choices /object_info offers for COMBO input ``name`` of ``node_id``: V1 lists them as
        ``[[choices...], {...}]``, V3 (how ComfyUI 0.3.64 takes the pack) as ``["COMBO", {"options": [...]}]``."""
        info = self.call("GET", f"/object_info/{node_id}")[1][node_id]["input"]
        spec = {**info.get("required", {}), **info.get("optional", {})}[name]
        return spec[1]["options"] if spec[0] == "COMBO" else spec[0]

    def queue(self, prompt: dict) -> str:
        """Queue ``prompt`` (it must be accepted); its prompt id."""
        status, queued = self.call("POST", "/prompt", {"prompt": prompt})
        assert status == 200 and not queued["node_errors"], f"refused: {queued}"
        return queued["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry of queued prompt ``prompt_id``, once it is done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, history = self.call("GET", f"/history/{prompt_id}")
            if history and history[prompt_id]["status"].get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.2)
        raise AssertionError(f"not done in {timeout} s; log:\n{self.log.read_text()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue ``prompt``, wait for it, return its history entry."""
        return self.wait(self.queue(prompt), timeout)


def start_comfyui(base: Path, names: dict, args: tuple = (), env: dict | None = None):
    """Start ComfyUI on ``base`` (its --base-directory); a generator yielding the server, stopping it after."""
    folder = Path(COMFYUI).resolve()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = base / "comfyui.log"
    # ComfyUI's torch gets this process's intra-op thread count (tests/conftest.py sets 1; torch's default
    # is one per core): how a convolution or matmul splits its sums over threads sets the last bits of
    # its floats, so with another count an image compared with our Runtime's differs by one level in a
    # few values (measured: 8 of the 4 x 12,288 values of a 2x2 tiny-sd15 sweep grid, 2 threads vs 1).
    import torch

    threads = str(torch.get_num_threads())
    with open(log, "wb") as out:
        process = subprocess.Popen([comfyui_python(folder), str(folder / "main.py"), "--cpu", "--listen", "127.0.0.1",
                                    "--port", str(port), "--base-directory", str(base), "--disable-auto-launch",
                                    *args], cwd=base, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                                        **(env or {})})
    server = ComfyUI(f"http://127.0.0.1:{port}", log, base, names)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if server.call("GET", "/object_info/KSampler")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, \
                f"ComfyUI did not start:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield server
    finally:
        process.terminate()
        process.wait(30)


def comfyui_base(base: Path) -> dict:
    """Lay out a ComfyUI base folder: our pack in custom_nodes, our LoRA fixtures in models/loras, a
    diffusers folder and a checkpoint that are listed (never read). Returns the LoRA fixture names."""
    from loraloom.fixtures import UNET_PRESETS, write_fixtures

    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "loraloom").symlink_to(ROOT, target_is_directory=True)
    models = base / "models"
    names = {k: p.relative_to(models / "loras").as_posix()
             for k, p in write_fixtures(models / "loras", presets=UNET_PRESETS).items()}
    (models / "diffusers" / "sd15").mkdir(parents=True)
    (models / "diffusers" / "sd15" / "model_index.json").write_text("{}")
    (models / "checkpoints").mkdir()
    (models / "checkpoints" / "model.safetensors").write_bytes(b"")
    return names


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """ComfyUI with our pack, a LoRA folder of our fixtures, a diffusers folder and a checkpoint to list."""
    base = tmp_path_factory.mktemp("comfyui-base")
    server = start_comfyui(base, comfyui_base(base))
    running = next(server)
    assert running.call("GET", "/object_info/LoadLoRA")[1], f"ComfyUI did not load our pack:\n{running.log.read_text()[-3000:]}"
    yield running
    next(server, None)


class Prompts:
    """Prompt entries for our nodes as ComfyUI needs them: every widget given (it fills in no defaults)."""

    @staticmethod
    def full(node_id: str, **inputs) -> dict:
        import loraloom

        cls = loraloom.NODE_CLASS_MAPPINGS[node_id]
        defaults = {inp.name: inp.default for inp in cls.SCHEMA.widgets if inp.has_default}
        return {"class_type": node_id, "inputs": {**defaults, **inputs}}

    def base(self, source="tiny-sd15", config="auto"):
        return self.full("LoadBase", source=source, config=config, dtype="fp32", device="cpu")

    def sample(self, model, **kw):
        return self.full("Sample", model=model, **{"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
                                                   "guidance": 5.0, "scheduler": "euler", **kw})

    @staticmethod
    def save_image(images):  # ComfyUI's own SaveImage: our IMAGE is its IMAGE
        return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": "loom"}}

    @staticmethod
    def lora(name: str) -> dict:
        return {"class_type": "LoadLoRA", "inputs": {"lora_name": name}}

    def blend(self, lora: str, weight: float, **sample) -> dict:
        """A whole prompt: LoRA file ``lora`` blended into tiny-sd15 at ``weight`` (node 3), sampled
        (node 4, ``sample`` its inputs), the image saved by ComfyUI's SaveImage (node 5)."""
        return {"1": self.base(), "2": self.lora(lora),
                "3": self.full("WeightedBlend", model=["1", 0], lora=["2", 0], weight=weight),
                "4": self.sample(["3", 0], **sample), "5": self.save_image(["4", 0])}

    def sweep_grid(self, lora: str, weights: tuple, seeds: tuple, **sample) -> dict:
        """:meth:`blend` (weight 0.8) with a SweepGrid (node 5) over the blend's ``weights`` (x) and the
        sample's ``seeds`` (y) between the sample and the SaveImage (node 6)."""
        prompt = self.blend(lora, 0.8, **sample)
        prompt["5"] = self.full("SweepGrid", images=["4", 0], x_axis="3.weight=" + ",".join(map(str, weights)),
                                y_axis="4.seed=" + ",".join(map(str, seeds)))
        prompt["6"] = self.save_image(["5", 0])
        return prompt

    def bad_values(self, lora: str, bad_base: dict) -> dict:
        """A prompt of good and bad nodes for the queue-time checks (V1 and V3 alike): the bad ones are
        those of ``BAD_VALUES`` and node 9, ``bad_base`` (a LoadBase refused for the caller's reason);
        ``lora``: a LoRA name the loras folder holds."""
        return {
            "1": self.base(), "2": self.sample(["1", 0], width=130), "3": self.save_image(["2", 0]),
            "4": self.sample(["1", 0], scheduler="pndm", steps=2), "5": self.save_image(["4", 0]),
            "6": self.base(config="diffusers/sd15"), "7": self.sample(["6", 0]), "8": self.save_image(["7", 0]),
            "9": bad_base, "10": self.sample(["9", 0]), "11": self.save_image(["10", 0]),
            "12": self.lora(lora), "13": self.full("SaveLoRA", lora=["12", 0], filename_prefix="../escape"),
            "14": self.lora("../" + lora), "15": self.full("SaveLoRA", lora=["14", 0]),
            "16": self.sample(["1", 0], prompt="x" * 20_001), "17": self.save_image(["16", 0]),
        }


# What the queue-time checks say of the bad nodes of Prompts.bad_values (node 9 is the caller's).
BAD_VALUES = {"2": "input 'width': 130 is not a multiple of 8", "4": "the fewest steps the pndm scheduler can take",
              "6": "preset 'tiny-sd15' needs no config", "13": "output name '../escape' contains a '..' part",
              "14": "contains a '..' part", "16": "20001 characters is above the limit 20000"}


def node_errors(body: dict) -> dict:
    """{node id: its errors' details joined} of a refused prompt's answer."""
    return {nid: " | ".join(e["details"] for e in entry["errors"]) for nid, entry in body["node_errors"].items()}


def sweep_folder(server: ComfyUI, done: dict) -> Path:
    """The folder of the one sweep grid a finished run (its history entry ``done``) shows."""
    assert done["status"]["status_str"] == "success", done["status"]
    shown = [image for out in done["outputs"].values() for image in out.get("images", [])
             if image["subfolder"].startswith("sweeps/")]
    assert [image["filename"] for image in shown] == ["grid.png"], done["outputs"]
    return server.base / "output" / shown[0]["subfolder"]


@pytest.fixture
def prompts():
    return Prompts()
