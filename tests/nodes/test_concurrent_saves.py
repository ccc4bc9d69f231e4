"""Saves into one output folder at the same moment, from threads and from processes: every save keeps
its own complete file under its own number, and the name each reports is the file it wrote."""

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from PIL import Image
from safetensors import safe_open

from loraloom.api import Runtime

RUNTIMES, SAVES = 4, 3

DTYPES = ("fp32", "fp16", "bf16")  # one per save of a Runtime: the same inputs again would be a cache hit


def _save_lora(index):
    return {"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": "demo-a.safetensors"}},
            "4": {"class_type": "SaveLoRA", "inputs": {"lora": ["1", 0], "filename_prefix": "loras/m",
                                                       "format": "kohya", "dtype": DTYPES[index % SAVES]}}}


def _save_image(level):
    return {"1": {"class_type": "SolidImage", "inputs": {"level": level}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "imgs/s"}}}


def _run_in_threads(out, workflow_for, solid_image):
    """RUNTIMES Runtimes over one output folder, each in its own thread, each saving SAVES times,
    all started together; returns every reported output reference."""
    runtimes = [Runtime(output_dir=out, nodes=[solid_image], demo_loras=True) for _ in range(RUNTIMES)]
    start = threading.Barrier(RUNTIMES)
    refs, errors = [], []

    def work(index, rt):
        try:
            start.wait()
            for save in range(SAVES):
                outputs = rt.run(workflow_for(index * SAVES + save)).outputs
                refs.extend(ref for ui in outputs.values() for key in ("loras", "images") for ref in ui.get(key, []))
        except BaseException as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, rt)) for i, rt in enumerate(runtimes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return refs


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_four_runtimes_in_threads_keep_all_twelve_loras(tmp_path, solid_image):
    out = tmp_path / "out"
    refs = _run_in_threads(out, _save_lora, solid_image)
    names = sorted(ref["filename"] for ref in refs)
    assert len(set(names)) == RUNTIMES * SAVES, f"every save reports its own name: {names}"
    assert _files(out / "loras") == names, "every reported file is there, and nothing else (no temp files)"
    assert names == [f"m_{n:05d}_.safetensors" for n in range(1, RUNTIMES * SAVES + 1)], "numbers 1..12, no gap"
    for name in names:
        with safe_open(out / "loras" / name, "pt") as f:
            assert f.keys(), f"{name} is a whole LoRA file"


def test_four_runtimes_in_threads_keep_all_twelve_images_each_with_its_own_content(tmp_path, solid_image):
    out = tmp_path / "out"
    refs = _run_in_threads(out, _save_image, solid_image)
    assert len({ref["filename"] for ref in refs}) == RUNTIMES * SAVES, refs
    assert _files(out / "imgs") == sorted(ref["filename"] for ref in refs)
    levels = set()
    for ref in refs:
        with Image.open(out / "imgs" / ref["filename"]) as img:
            level, prompt = img.getpixel((15, 15))[0], json.loads(img.text["prompt"])
        assert prompt["1"]["inputs"]["level"] == level, f"{ref['filename']}: the pixels and the prompt of one run"
        levels.add(level)
    assert levels == set(range(RUNTIMES * SAVES)), "each file holds the image of the run that reported it"


PROCESS = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    from loraloom.api import Runtime

    out, go, index = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    workflows = json.loads(sys.argv[4])
    rt = Runtime(output_dir=out, demo_loras=True)
    rt.validate(workflows[0])  # imports and folder set-up done before the start line
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    names = [rt.run(wf).outputs["4"]["loras"][0]["filename"] for wf in workflows]
    print(json.dumps(names), flush=True)
''')


def test_four_processes_saving_into_one_folder_keep_every_file(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    env = os.environ.copy()
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS, str(out), str(go), str(i),
                               json.dumps([_save_lora(n) for n in range(SAVES)])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(RUNTIMES)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        go.touch()
        reported = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr
            reported += json.loads(stdout.strip().splitlines()[-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert len(set(reported)) == RUNTIMES * SAVES, f"each process reports names no other one reports: {reported}"
    assert _files(out / "loras") == sorted(reported), "every reported file is there, and no temp file"
    for name in reported:
        with safe_open(out / "loras" / name, "pt") as f:
            assert f.keys(), f"{name} is a whole LoRA file"
