"""No input file may produce a traceback from the CLI.

A corpus of broken inputs of every kind a user passes (workflow JSON, workflow PNGs, the LoRA files
and base checkpoints a workflow names) goes through ``loraloom validate`` and ``loraloom run``: each
ends with README's exit code (0 success, 1 validation or execution error, 2 a path that cannot be opened), an error of a few lines
that names the file, and no traceback. The corpus runs through the CLI's ``main()`` in this process
(output captured: what a user's terminal would show); two cases go through the real console entry
point in subprocesses, to show the in-process run is what a user sees.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraloom import cli

LORA_KEY = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _png(*chunks: tuple[bytes, bytes]) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    body = b"".join(chunk(kind, data) for kind, data in chunks)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")


def _lora(path: Path, value: float = 0.1) -> Path:
    save_file({f"{LORA_KEY}.lora_down.weight": torch.full((4, 8), value),
               f"{LORA_KEY}.lora_up.weight": torch.full((8, 4), value), f"{LORA_KEY}.alpha": torch.tensor(4.0)}, str(path))
    return path


def _lora_workflow(name: str) -> dict:
    return {"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": name}},
            "2": {"class_type": "SaveLoRA", "inputs": {"lora": ["1", 0], "filename_prefix": "loras/out"}}}


def _base_workflow(source: str, config: str = "auto") -> dict:
    return {"1": {"class_type": "LoadBase", "inputs": {"source": source, "config": config, "dtype": "fp32",
                                                     "device": "cpu"}},
            "2": {"class_type": "SavePipeline", "inputs": {"model": ["1", 0], "filename_prefix": "pipelines/out"}}}


def _nan(path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors[sorted(tensors)[min(3, len(tensors) - 1)]].view(-1)[0] = float("nan")
    save_file(tensors, str(path))


def _corpus(root: Path, model_files) -> list[tuple[str, list[str], int, str]]:
    """(case, argv, exit code, what the error must name) for every broken input."""
    wf_dir, loras, models = root / "wf", root / "loras", root / "models"
    for d in (wf_dir, loras, models / "checkpoints"):
        d.mkdir(parents=True)
    dirs = ["--lora-dir", str(loras), "--models-dir", str(models), "--output-dir", str(root / "out")]
    cases = []

    def workflow(name: str, content: bytes | None, command: str = "validate", code: int = 1) -> None:
        path = wf_dir / name
        if content is not None:
            path.write_bytes(content)
        cases.append((name, [command, str(path), *dirs] + (["--no-progress"] if command == "run" else []), code,
                      str(path)))

    # Workflow JSON
    good = json.dumps(_lora_workflow("good.safetensors")).encode()
    _lora(loras / "good.safetensors")
    workflow("valid.json", good, code=0)
    workflow("truncated.json", good[:-7])
    for i, text in enumerate(['[1, 2, 3]', '{"1": 5}', '{"1": {"class_type": 7, "inputs": []}}', '"text"', "null",
                              '{"nodes": 5, "links": "x"}', '{"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": 5}}}']):
        workflow(f"wrong-types-{i}.json", text.encode())
    workflow("deep.json", b"[" * 100_000 + b"]" * 100_000)
    workflow("huge-int.json", b'{"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": ' + b"9" * 5000 + b"}}}")
    workflow("huge-float.json", b'{"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": 1e999}}}')
    workflow("nan.json", b'{"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": NaN}}}')
    workflow("bom.json", b"\xef\xbb\xbf" + good, code=0)  # as saved by a Windows editor
    workflow("latin1.json", b'{"1": {"class_type": "LoadLoRA", "inputs": {"lora_name": "caf\xe9"}}}')
    workflow("empty.json", b"")
    (wf_dir / "folder.json").mkdir()
    workflow("folder.json", None)
    os.mkfifo(wf_dir / "fifo.json")
    workflow("fifo.json", None)
    workflow("missing.json", None, code=2)  # a path that cannot be opened is a usage error
    # Workflow PNGs: valid, malformed, a bomb
    workflow("valid.png", _png((b"tEXt", b"prompt\0" + good)), code=0)
    workflow("itxt-flag.png", _png((b"iTXt", b"prompt\0\2\0\0\0" + good)))
    workflow("itxt-empty.png", _png((b"iTXt", b"prompt\0")))
    workflow("itxt-bomb.png", _png((b"iTXt", b"prompt\0\1\0\0\0" + zlib.compress(b" " * 100 * 2**20, 9))))
    workflow("truncated.png", _png((b"tEXt", b"prompt\0" + good))[:40])
    workflow("html.png", b"<html>not an image</html>")
    workflow("no-workflow.png", _png())
    # LoRA files a workflow names, through `run`
    lora_cases = {"truncated": _lora(loras / "x.safetensors").read_bytes()[:-10],
                  "bad-header": (10**12).to_bytes(8, "little") + b"{}",
                  "empty": b"", "html": b"<!DOCTYPE html><html></html>"}
    for name, data in lora_cases.items():
        (loras / f"{name}.safetensors").write_bytes(data)
    _nan(_lora(loras / "nan.safetensors"))
    torch.save({"x": torch.zeros(1)}, loras / "pickle.safetensors")
    peft_key = "unet.down_blocks.0.attentions.0.proj_in"
    save_file({f"{peft_key}.lora_A.weight": torch.zeros(4, 8), f"{peft_key}.lora_B.weight": torch.zeros(8, 4)},
              str(loras / "deep-metadata.safetensors"), metadata={"lora_adapter_metadata": "[" * 10**5 + "]" * 10**5})
    for name in [*lora_cases, "nan", "pickle", "deep-metadata"]:
        workflow(f"lora-{name}.json", json.dumps(_lora_workflow(f"{name}.safetensors")).encode(), "run")
        cases[-1] = (*cases[-1][:3], str(loras / f"{name}.safetensors"))
    # Base checkpoints a workflow names, through `run`
    files = model_files("tiny-sd15")
    shutil.copytree(files["config"], models / "config")
    singles = {"nan": _nan, "truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]),
               "pickle": lambda p: torch.save({"x": torch.zeros(1)}, p)}
    for name, damage in singles.items():
        path = models / "checkpoints" / f"{name}.safetensors"
        shutil.copy(files["single_file"], path)
        damage(path)
        workflow(f"base-{name}.json", json.dumps(_base_workflow(f"checkpoints/{name}.safetensors", "config")).encode(),
                 "run")
        cases[-1] = (*cases[-1][:3], str(path))
    folders = {"sample-size": ("unet/config.json", lambda p: p.write_text(json.dumps(
                   {**json.loads(p.read_text()), "sample_size": 10**9}))),
               "bad-index": ("model_index.json", lambda p: p.write_text('{"_class_name": ')),
               "nan-weights": ("unet/diffusion_pytorch_model.safetensors", _nan)}
    for name, (rel, damage) in folders.items():
        folder = shutil.copytree(files["folder"], models / name)
        damage(folder / rel)
        workflow(f"base-{name}.json", json.dumps(_base_workflow(name)).encode(), "run")
        cases[-1] = (*cases[-1][:3], str(folder / rel) if name != "bad-index" else name)
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_files):
    root = tmp_path_factory.mktemp("cli-inputs")
    return root, _corpus(root, tiny_model_files)


def test_no_input_file_gives_a_traceback(corpus, capsys):
    problems = []
    for case, argv, code, names in corpus[1]:
        try:
            rc = cli.main(argv)
        except BaseException as exc:  # what would reach the user as a traceback
            problems.append(f"{case}: raised {type(exc).__name__}: {exc}")
            continue
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        if rc != code:
            problems.append(f"{case}: exit code {rc}, expected {code}: {err.strip()[:300]}")
        elif "Traceback" in out + err:
            problems.append(f"{case}: printed a traceback:\n{err}")
        elif code and not (names in err and 1 <= len(lines) <= 4):
            problems.append(f"{case}: the error should name {names} in at most 4 lines:\n{err}")
    assert not problems, "\n".join(problems)


def _real_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraloom.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.mark.parametrize("case", ["itxt-bomb.png", "base-nan.json"])
def test_the_console_entry_point_shows_the_same(corpus, case):
    _, argv, code, names = next(c for c in corpus[1] if c[0] == case)
    done = _real_cli(*argv)
    assert done.returncode == code and "Traceback" not in done.stderr, done.stderr
    assert names in done.stderr and len(done.stderr.strip().splitlines()) <= 4, done.stderr
