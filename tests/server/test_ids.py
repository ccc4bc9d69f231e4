"""The server and the renamed node ids: /object_info lists each old id as a deprecated node (the
editor then opens old workflows but offers only the new ids), and /prompt runs a prompt written with
the old ids, sharing its cache with the same prompt under the new ids."""

from loraloom.api import Runtime as NodesRuntime


def prompt(load="LoraLoomLoadBase", sample="LoraLoomSample"):
    return {"1": {"class_type": load, "inputs": {"source": "tiny-sd15"}},
            "2": {"class_type": sample, "inputs": {"model": ["1", 0], "prompt": "a cat", "steps": 1, "width": 64,
                                                   "height": 64}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


async def test_object_info_lists_old_ids_as_deprecated_and_prompt_runs_them(serve, tmp_path):
    rt = NodesRuntime(models_dir=tmp_path / "models", output_dir=tmp_path / "output", lora_dirs=[tmp_path])
    ran: dict[str, list[str]] = {}
    rt.add_listener(lambda e: ran.setdefault(e["prompt_id"], []).append(e["node"]) if e["event"] == "executing" else None)
    async with serve(runtime=rt) as server:
        info = await (await server.client.get("/api/object_info")).json()
        new, old = info["LoraLoomLoadLoRA"], info["LoadLoRA"]
        assert "deprecated" not in new and new["display_name"] == "Loom Load LoRA"
        assert old["deprecated"] is True and old["name"] == "LoadLoRA", "the frontend hides it from its search"
        assert old["input"] == new["input"] and old["display_name"] == "Loom Load LoRA [old id LoadLoRA]"
        assert not any(v.get("deprecated") for k, v in info.items() if k.startswith("LoraLoom"))
        one = await (await server.client.get("/api/object_info/Sample")).json()
        assert one["Sample"]["deprecated"] is True and one["Sample"]["input"] == info["LoraLoomSample"]["input"]

        first = await server.submit(prompt("LoadBase", "Sample"))
        done = await server.wait_done(first["prompt_id"], timeout=120)
        assert done["status"]["status_str"] == "success", done["status"]
        assert ran[first["prompt_id"]] == ["1", "2", "3"], "the old ids ran"
        again = await server.submit(prompt())
        cached = await server.wait_done(again["prompt_id"], timeout=120)
        assert cached["status"]["status_str"] == "success", cached["status"]
        assert ran.get(again["prompt_id"], []) == [], "the new ids find every result of the old ids cached"
        assert cached["outputs"] == done["outputs"] and done["outputs"]["3"]["images"]
