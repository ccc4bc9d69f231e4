"""The ComfyUI-compatible API: every endpoint, with and without the /api prefix, and the websocket
protocol of a run (start, cached, executing, progress, executed, success, executing null)."""

import asyncio
import json
import sys

import pytest

STARTUP_ROUTES = [  # what the frontend asks for at start, and the JSON type it expects
    ("/users", dict), ("/settings", dict), ("/extensions", list), ("/embeddings", list), ("/i18n", dict),
    ("/features", dict), ("/workflow_templates", dict), ("/global_subgraphs", dict),
    ("/experiment/models", list), ("/models", list), ("/models/loras", list), ("/system_stats", dict),
    ("/object_info", dict), ("/prompt", dict), ("/queue", dict), ("/history", dict), ("/jobs", dict),
    ("/userdata?dir=workflows&recurse=true&split=false&full_info=true", list),
    ("/userdata?dir=subgraphs&recurse=true&split=false&full_info=true", list),
    ("/userdata/comfy.templates.json", list),
]


async def receive_run(ws, prompt_id: str) -> list[dict]:
    """Websocket messages of one run, up to ``executing`` with node null."""
    messages = []
    while True:
        msg = await asyncio.wait_for(ws.receive_json(), timeout=30)
        if msg["type"] == "status":
            continue
        assert msg["data"].get("prompt_id") == prompt_id, f"a message of another prompt: {msg}"
        messages.append(msg)
        if msg["type"] == "executing" and msg["data"]["node"] is None:
            return messages


@pytest.mark.parametrize("prefix", ["/api", ""])
async def test_startup_routes_answer_json(serve, prefix):
    async with serve() as server:
        for path, kind in STARTUP_ROUTES:
            resp = await server.client.get(prefix + path)
            assert resp.status == 200, f"GET {prefix}{path}: {resp.status} {await resp.text()}"
            assert isinstance(await resp.json(), kind), f"GET {prefix}{path} must answer a JSON {kind.__name__}"


async def test_page_static_files_and_defaults(serve, frontend):
    async with serve() as server:
        resp = await server.client.get("/")
        assert resp.status == 200 and "editor" in await resp.text(), "GET / serves the frontend's index.html"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        resp = await server.client.get("/assets/index.js")
        assert resp.status == 200 and "javascript" in resp.headers["Content-Type"]
        for path in ("/user.css", "/api/userdata/user.css"):
            resp = await server.client.get(path)
            assert (resp.status, resp.content_type) == (200, "text/css"), f"{path} must be an empty stylesheet"
        for path in ("/templates/index.json", "/templates/index.fr.json"):
            assert await (await server.client.get(path)).json() == []
        assert await (await server.client.get("/templates/index_logo.json")).json() == {}
        assert (await server.client.get("/assets/missing.js")).status == 404


@pytest.mark.parametrize("prefix", ["/api", ""])
async def test_the_shipped_workflows_are_the_template_browsers_with_their_thumbnails(serve, prefix):
    from loraloom.api import SHIPPED_WORKFLOWS

    async with serve() as server:
        listed = await (await server.client.get(prefix + "/workflow_templates")).json()
        assert listed == {"loraloom": sorted(p.stem for p in SHIPPED_WORKFLOWS.glob("*.json"))}, listed
        for name in listed["loraloom"]:
            resp = await server.client.get(f"{prefix}/workflow_templates/loraloom/{name}.json")
            assert resp.status == 200 and (await resp.json())["nodes"], name
            resp = await server.client.get(f"{prefix}/workflow_templates/loraloom/{name}.jpg")
            assert resp.status == 200 and resp.content_type == "image/jpeg", name
        for name in ("blend_api.json", "api/blend_api.json", "..%2Fapi.py", "loras", "blend.png", ".json"):
            resp = await server.client.get(f"{prefix}/workflow_templates/loraloom/{name}")
            assert resp.status == 404, f"{name}: only the folder's own workflows and thumbnails are served"


@pytest.mark.parametrize("prefix", ["/api", ""])
async def test_the_packs_editor_extension_is_listed_and_served_as_comfyui_does(serve, prefix):
    """ComfyUI lists a node pack's WEB_DIRECTORY files as /extensions/<pack>/<file> and serves them there."""
    import loraloom

    async with serve() as server:
        listed = await (await server.client.get(prefix + "/extensions")).json()
        assert listed == ["/extensions/loraloom/loraloom.js"]
        resp = await server.client.get(listed[0])
        assert resp.status == 200 and "javascript" in resp.headers["Content-Type"]
        assert "registerExtension" in await resp.text()
    assert loraloom.WEB_DIRECTORY == "./web", "ComfyUI reads the folder from the pack's __init__"


async def test_without_the_frontend_the_page_says_how_to_install_it(serve, monkeypatch):
    monkeypatch.setattr("loraloom.server.app.find_frontend", lambda: None)
    async with serve(frontend_dir=None) as server:
        resp = await server.client.get("/")
        assert resp.status == 503 and "loraloom[editor]" in await resp.text()
        assert (await server.client.get("/api/queue")).status == 200, "the API works without the editor"


async def test_system_stats_reports_the_real_command_line_without_the_token(serve):
    # ComfyUI reports its sys.argv; ours, as started, with the token (which every client would see) hidden
    argv = ["/usr/bin/loraloom", "serve", "--port", "8190", "--token", "s3cret", "--allow-host=s3cret.lan"]
    async with serve(token="s3cret", argv=argv) as server:
        resp = await server.client.get("/api/system_stats", headers={"Authorization": "Bearer s3cret"})
        stats = await resp.json()
        assert "s3cret" not in json.dumps(stats), "the token must never leave the server"
        assert stats["system"]["argv"] == ["/usr/bin/loraloom", "serve", "--port", "8190", "--token", "<token>",
                                           "--allow-host=<token>.lan"]
        assert stats["devices"] and {"name", "type", "vram_total", "vram_free"} <= set(stats["devices"][0])
    async with serve() as server:
        stats = await (await server.client.get("/system_stats")).json()
        assert stats["system"]["argv"] == sys.argv, "by default, this process's own command line"


async def test_version_updates_are_off_until_the_user_turns_them_on(serve):
    # The frontend asks ComfyUI's release service about ComfyUI's releases (not this server's) unless
    # argv holds --disable-api-nodes, which ours does not: the setting's default stops it.
    async with serve() as server:
        setting = "/api/settings/Comfy.Notification.ShowVersionUpdates"
        assert await (await server.client.get(setting)).json() is False
        assert (await (await server.client.get("/api/settings")).json())["Comfy.Notification.ShowVersionUpdates"] is False
        assert (await server.client.post(setting, json=True)).status == 200
        assert await (await server.client.get(setting)).json() is True, "the user's choice wins"


async def test_object_info_is_our_schema_with_folder_combos(serve, tmp_path):
    async with serve() as server:
        info = await (await server.client.get("/api/object_info")).json()
        assert {"Const", "Gate", "SaveImage", "PreviewImage"} <= set(info)
        const = info["Const"]
        assert const["input"]["required"]["value"][0] == "INT" and const["output"] == ["NUMBER"]
        assert info["Show"]["output_node"] is True
        one = await (await server.client.get("/object_info/Const")).json()
        assert one == {"Const": const}
        resp = await server.client.get("/api/object_info/NoSuchNode")
        assert resp.status == 404
        (tmp_path / "loras").mkdir()
        (tmp_path / "loras" / "x.safetensors").write_bytes(b"")
        assert await (await server.client.get("/api/models/loras")).json() == ["x.safetensors"]
        assert (await server.client.get("/api/models/checkpoints")).status == 404


async def test_a_run_over_the_websocket(serve, helpers):
    async with serve() as server:
        ws = await server.client.ws_connect("/ws?clientId=page-1")
        hello = await ws.receive_json()
        assert hello == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "page-1"}}
        await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        flags = await ws.receive_json()
        assert flags["type"] == "feature_flags" and "max_upload_size" in flags["data"]

        queued = await server.submit(helpers.image_prompt(), client_id="page-1")
        assert set(queued) == {"prompt_id", "number", "node_errors"} and queued["node_errors"] == {}
        messages = await receive_run(ws, queued["prompt_id"])
        kinds = [m["type"] for m in messages]
        assert kinds[0] == "execution_start" and kinds[-2:] == ["execution_success", "executing"], kinds
        assert [m["data"]["node"] for m in messages if m["type"] == "executing"] == ["1", "2", "3", "4", None]
        executed = {m["data"]["node"]: m["data"]["output"] for m in messages if m["type"] == "executed"}
        assert executed["3"] == {"images": [{"filename": "test_00001_.png", "subfolder": "", "type": "output"}]}
        preview = executed["4"]["images"][0]
        assert preview["type"] == "temp", "PreviewImage writes temp files"

        for ref in (executed["3"]["images"][0], preview):
            resp = await server.client.get("/api/view", params=ref)
            assert resp.status == 200 and resp.content_type == "image/png", f"/view of {ref}"
            assert (await resp.read())[:8] == b"\x89PNG\r\n\x1a\n"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"

        history = await server.wait_done(queued["prompt_id"])
        assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
        assert history["outputs"]["3"] == executed["3"]
        assert history["prompt"][1] == queued["prompt_id"] and history["prompt"][3]["client_id"] == "page-1"
        assert [m[0] for m in history["status"]["messages"]] == ["execution_start", "execution_success"]

        again = await server.submit(helpers.image_prompt(), client_id="page-1")
        messages = await receive_run(ws, again["prompt_id"])
        cached = [m for m in messages if m["type"] == "execution_cached"]
        assert cached and set(cached[0]["data"]["nodes"]) == {"3", "4"}, "an unchanged prompt runs nothing"
        outputs = {m["data"]["node"]: m["data"]["output"] for m in messages if m["type"] == "executed"}
        assert outputs["3"] == executed["3"], "cached outputs are sent again, so the page shows them"
        await ws.close()


async def test_progress_messages(serve, helpers):
    async with serve() as server:
        ws = await server.client.ws_connect("/ws?clientId=p2")
        queued = await server.submit(helpers.chain(steps=4), client_id="p2")
        messages = await receive_run(ws, queued["prompt_id"])
        progress = [m["data"] for m in messages if m["type"] == "progress"]
        assert [(p["value"], p["max"], p["node"]) for p in progress] == [(i, 4, "3") for i in range(1, 5)]
        await ws.close()


async def test_messages_go_to_the_submitting_client_only(serve, helpers):
    async with serve() as server:
        mine = await server.client.ws_connect("/ws?clientId=mine")
        other = await server.client.ws_connect("/ws?clientId=other")
        await mine.receive_json(), await other.receive_json()
        queued = await server.submit(helpers.chain(), client_id="mine")
        await receive_run(mine, queued["prompt_id"])
        while True:  # the other client sees queue status only
            msg = await asyncio.wait_for(other.receive_json(), timeout=5)
            assert msg["type"] == "status", f"another client's run leaked: {msg}"
            if msg["data"]["status"]["exec_info"]["queue_remaining"] == 0:
                break
        await mine.close(), await other.close()


@pytest.mark.parametrize("body, kind", [
    ({}, "no_prompt"),
    ({"prompt": "not an object"}, "no_prompt"),
    ({"prompt": {"1": {"class_type": "Const", "inputs": {}}}, "client_id": "bad id!"}, "invalid_prompt"),
    ({"prompt": {"1": {"class_type": "Const", "inputs": {}}}, "extra_data": []}, "invalid_prompt"),
    ({"prompt": {"1": "not a node"}}, "invalid_prompt"),
])
async def test_malformed_prompt_bodies_are_400(serve, body, kind):
    async with serve() as server:
        resp = await server.client.post("/api/prompt", json=body)
        data = await resp.json()
        assert resp.status == 400, data
        assert set(data) == {"error", "node_errors"} and data["error"]["type"] == kind
        assert set(data["error"]) == {"type", "message", "details", "extra_info"}


async def test_invalid_prompts_are_400_with_node_errors(serve, helpers):
    async with serve() as server:
        bad = helpers.chain()
        bad["1"]["inputs"]["value"] = 5000
        bad["9"] = {"class_type": "NoSuchNode", "inputs": {}}
        resp = await server.client.post("/prompt", json={"prompt": bad})
        data = await resp.json()
        assert resp.status == 400
        assert set(data["error"]) == {"type", "message", "details", "extra_info"}
        assert {"1", "9"} <= set(data["node_errors"]), data["node_errors"]
        error = data["node_errors"]["1"]["errors"][0]
        assert error["extra_info"]["input_name"] == "value" and "1000" in error["details"]
        assert data["node_errors"]["1"]["class_type"] == "Const"
        missing = data["node_errors"]["9"]["errors"][0]["extra_info"]
        assert (missing["kind"], missing["value"]) == ("missing_node_type", "NoSuchNode"), "our error's fields"
        assert missing["fix"] == "check the spelling, or install the pack that provides it"
        assert (await (await server.client.get("/api/queue")).json())["queue_pending"] == [], "nothing was queued"


async def test_a_flux_sample_the_base_cannot_take_is_refused_at_queue_time(serve, tmp_path):
    """What the base feeding a Sample cannot take (here Flux: a negative prompt, a width that is no
    multiple of 16, a UNet scheduler) is in node_errors, every problem at once, and nothing runs."""
    from loraloom.api import Runtime as NodesRuntime

    rt = NodesRuntime(models_dir=tmp_path / "models", output_dir=tmp_path / "output")
    prompt = {"1": {"class_type": "LoadBase", "inputs": {"source": "tiny-flux"}},
              "2": {"class_type": "Sample", "inputs": {"model": ["1", 0], "negative_prompt": "blurry", "width": 72,
                                                       "scheduler": "ddim", "steps": 2}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    async with serve(runtime=rt) as server:
        resp = await server.client.post("/prompt", json={"prompt": prompt})
        data = await resp.json()
        assert resp.status == 400 and list(data["node_errors"]) == ["2"], data
        errors = data["node_errors"]["2"]["errors"]
        assert sorted(e["extra_info"]["input_name"] for e in errors) == ["negative_prompt", "scheduler", "width"]
        width = next(e for e in errors if e["extra_info"]["input_name"] == "width")
        assert (width["extra_info"]["value"], width["extra_info"]["limit"]) == (72, "a multiple of 16")
        assert "node 2 (Sample) input 'width'" in width["details"] and "Fix: use 64 or 80" in width["details"]
        assert (await (await server.client.get("/api/queue")).json())["queue_pending"] == [], "nothing was queued"
        assert server.started == [], "nothing ran"


@pytest.mark.parametrize("text, problem", [
    ('{"prompt": {', "invalid JSON"),
    ('{"prompt": {"1": {"class_type": "Const", "inputs": {"value": NaN}}}}', "finite"),
    ('{"prompt": {}, "prompt": {}}', "duplicate key"),
    ('{"a": ' * 100 + "1" + "}" * 100, "nesting"),
])
async def test_bodies_are_parsed_strictly(serve, text, problem):
    async with serve() as server:
        resp = await server.client.post("/api/prompt", data=text, headers={"Content-Type": "application/json"})
        data = await resp.json()
        assert resp.status == 400 and problem in data["error"]["message"], data


async def test_error_fields_are_in_extra_info(serve):
    async with serve() as server:
        text = '{"prompt": {"1": {"class_type": "Const", "inputs": {"value": NaN}}}}'
        resp = await server.client.post("/api/prompt", data=text, headers={"Content-Type": "application/json"})
        error = (await resp.json())["error"]
        assert resp.status == 400 and error["type"] == "invalid_json"
        assert error["extra_info"] == {"file": "request body", "node": "1", "class_type": "Const", "input": "value",
                                       "value": "NaN", "kind": "not_finite",
                                       "message": "NaN is not a finite number; JSON workflows may hold only "
                                                  "finite numbers", "type": "loraloom.WorkflowError"}, error


async def test_partial_execution_targets_and_client_prompt_id(serve, helpers):
    async with serve() as server:
        prompt = helpers.image_prompt()
        queued = await server.submit(prompt, prompt_id="my-id-1", partial_execution_targets=["3"])
        assert queued["prompt_id"] == "my-id-1"
        history = await server.wait_done("my-id-1")
        assert set(history["outputs"]) == {"3"}, "only the chosen output ran"
        keyed = await server.submit(prompt, extra_data={"extra_pnginfo": None, "api_key_comfy_org": "x"})
        assert "api_key" not in json.dumps((await server.wait_done(keyed["prompt_id"]))["prompt"]), \
            "only what a run needs is stored"
        data = await server.submit(prompt, expect=400, prompt_id="my-id-1")
        assert data["error"]["type"] == "duplicate_prompt_id"
        assert data["error"]["extra_info"]["kind"] == "duplicate_id", "the error's fields travel in extra_info"
        data = await server.submit(prompt, expect=400, partial_execution_targets=["77"])
        assert "77" in data["error"]["details"]


async def test_history_and_jobs(serve, helpers):
    async with serve() as server:
        ok = (await server.submit(helpers.image_prompt(), extra_data={"extra_pnginfo": {"workflow": {
            "id": "wf-1", "nodes": [], "links": [], "version": 0.4}}}))["prompt_id"]
        failed = (await server.submit(helpers.chain(fail=True)))["prompt_id"]
        await server.wait_done(ok), await server.wait_done(failed)

        history = await (await server.client.get("/history")).json()
        assert list(history) == [ok, failed], "oldest first"
        assert list(await (await server.client.get("/api/history?max_items=1")).json()) == [failed]
        assert (await server.client.get("/api/history?max_items=x")).status == 400

        jobs = await (await server.client.get("/api/jobs?status=completed,failed,cancelled&limit=64&offset=0")).json()
        assert jobs["pagination"] == {"offset": 0, "limit": 64, "total": 2, "has_more": False}
        by_id = {j["id"]: j for j in jobs["jobs"]}
        assert by_id[ok]["status"] == "completed" and by_id[ok]["workflow_id"] == "wf-1"
        assert by_id[ok]["preview_output"]["nodeId"] == "3" and by_id[ok]["preview_output"]["type"] == "output"
        assert by_id[ok]["outputs_count"] == 2
        assert by_id[failed]["status"] == "failed"
        assert by_id[failed]["execution_error"]["exception_message"] == "RuntimeError: asked to fail"
        assert isinstance(by_id[failed]["create_time"], int)
        page = await (await server.client.get("/api/jobs?limit=1&offset=0")).json()
        assert len(page["jobs"]) == 1 and page["pagination"]["has_more"] is True
        from PIL import Image

        saved = Image.open(server.rt.folders.output_dir / by_id[ok]["preview_output"]["filename"])
        assert json.loads(saved.text["workflow"])["id"] == "wf-1", "SaveImage embeds the page's workflow"
        assert json.loads(saved.text["prompt"])["3"]["class_type"] == "SaveImage"
        detail = await (await server.client.get(f"/api/jobs/{ok}")).json()
        assert detail["outputs"]["3"]["images"][0]["filename"].startswith("test_")
        assert detail["workflow"]["extra_data"]["extra_pnginfo"]["workflow"]["id"] == "wf-1"

        resp = await server.client.post("/api/history", json={"delete": [ok]})
        assert (await resp.json())["deleted"] == [ok]
        assert (await server.client.get(f"/api/history/{ok}")).status == 404, "a deleted prompt is unknown"
        await server.client.post("/history", json={"clear": True})
        assert await (await server.client.get("/api/history")).json() == {}


async def test_unknown_ids_are_404(serve):
    async with serve() as server:
        for method, path in [("GET", "/api/history/nope"), ("GET", "/history/nope"), ("GET", "/api/jobs/nope"),
                             ("POST", "/api/jobs/nope/cancel")]:
            resp = await server.client.request(method, path, headers={"Content-Type": "application/json"})
            assert resp.status == 404, f"{method} {path}: an unknown id is 404, never done"


async def test_nothing_a_request_sends_is_evaluated(serve, helpers, tmp_path):
    marker = tmp_path / "evaluated"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    async with serve() as server:
        queued = await server.submit(helpers.chain(text=code))
        history = await server.wait_done(queued["prompt_id"])
        assert history["outputs"]["5"]["text"] == [code], "a string stays a string"
        await server.client.post("/api/settings/Comfy.X", json=code)
        assert (await (await server.client.get("/api/settings/Comfy.X")).json()) == code
    assert not marker.exists()


async def test_free_clears_the_cache_between_prompts(serve, helpers):
    async with serve() as server:
        await server.wait_done((await server.submit(helpers.chain()))["prompt_id"])
        assert len(server.rt.cache) > 0
        resp = await server.client.post("/api/free", json={"unload_models": True, "free_memory": True})
        assert resp.status == 200
        for _ in range(500):
            if len(server.rt.cache) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(server.rt.cache) == 0, "free_memory empties the result cache"
        history = await server.wait_done((await server.submit(helpers.chain()))["prompt_id"])
        assert history["status"]["status_str"] == "success"


def _store_big_prompts(store, count: int, workflow_bytes: int) -> list[str]:
    """``count`` finished prompts, each carrying a workflow of ``workflow_bytes`` in its extra data."""
    workflow = {"id": "wf", "nodes": [], "blob": "x" * workflow_bytes}
    ids = []
    for i in range(count):
        prompt_id = f"big-{i}"
        store.add(prompt_id, {"1": {"class_type": "Const", "inputs": {"value": i}}},
                  {"create_time": i, "extra_pnginfo": {"workflow": workflow}}, ["1"])
        store.claim_next()
        store.finish(prompt_id, "success", {}, [])
        ids.append(prompt_id)
    return ids


class CountingJson:
    """The store's ``json`` module, counting the bytes the store parses."""

    def __init__(self):
        self.parsed = 0

    def loads(self, text):
        self.parsed += len(text)
        return json.loads(text)

    dumps = staticmethod(json.dumps)


async def test_history_and_jobs_read_only_the_page_they_answer(serve, monkeypatch):
    from loraloom.server import store as store_module

    async with serve() as server:
        ids = _store_big_prompts(server.state.store, 30, 200_000)
        counting = CountingJson()
        monkeypatch.setattr(store_module, "json", counting)
        history = await (await server.client.get("/api/history?max_items=1")).json()
        assert list(history) == [ids[-1]]
        assert 200_000 < counting.parsed < 2 * 200_000, f"parsed {counting.parsed} bytes for one prompt"

        counting.parsed = 0
        jobs = await (await server.client.get("/api/jobs?limit=2")).json()
        assert [j["id"] for j in jobs["jobs"]] == [ids[-1], ids[-2]], "newest first"
        assert jobs["jobs"][0]["workflow_id"] == "wf" and jobs["pagination"]["total"] == 30
        assert counting.parsed < 1000, f"the jobs list parsed {counting.parsed} bytes: it needs no workflow"
        asc = await (await server.client.get("/api/jobs?limit=2&offset=1&sort_order=asc&workflow_id=wf")).json()
        assert [j["id"] for j in asc["jobs"]] == ids[1:3] and asc["pagination"]["has_more"] is True
        for query in ("workflow_id=other", "status=no-such-status"):
            none = await (await server.client.get(f"/api/jobs?{query}")).json()
            assert none["jobs"] == [] and none["pagination"]["total"] == 0, query


@pytest.mark.parametrize("path", ["/api/history", "/api/jobs", "/api/queue"])
async def test_reading_the_store_never_blocks_other_requests(serve, path):
    """The big read is held inside the store; a small request is answered meanwhile. Were the read
    on the event loop, the small one would wait behind it (and this test would fail, not hang)."""
    import threading

    async with serve() as server:
        store = server.state.store
        entered, release = threading.Event(), threading.Event()
        for name in ("history", "jobs", "queue"):
            real = getattr(store, name)

            def held(*args, _real=real, **kwargs):
                entered.set()
                release.wait(5)
                return _real(*args, **kwargs)

            setattr(store, name, held)
        big = asyncio.ensure_future(server.client.get(path))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        small = await server.client.get("/api/prompt")
        assert small.status == 200
        assert not big.done() and not release.is_set(), "the small request was answered while the big one read"
        release.set()
        assert (await big).status == 200


@pytest.mark.parametrize("query", ["max_items=9223372036854775808", "offset=99999999999999999999",
                                   "max_items=-1"])
async def test_history_numbers_beyond_sqlite_are_400(serve, query):
    async with serve() as server:
        resp = await server.client.get(f"/api/history?{query}")
        body = await resp.json()
        assert resp.status == 400 and body["error"]["type"] == "bad_query", body
        assert query.split("=")[0] in body["error"]["message"]


# POST /loraloom/sweep: a sweep queued like a prompt, every cell validated at once, a message per cell on
# the websocket, the grid, cell images and manifest listed in the history and served by /view.
async def test_a_sweep_is_queued_streams_its_cells_and_lists_its_files(serve, helpers):
    async with serve() as server:
        ws = await server.client.ws_connect("/ws?clientId=sweeper")
        await ws.receive_json()
        resp = await server.client.post("/api/loraloom/sweep", json={
            "prompt": helpers.image_prompt(), "axes": ["1.value=1,2,3"], "seeds": None, "client_id": "sweeper"})
        queued = await resp.json()
        assert resp.status == 200 and queued["cells"] == 3 and queued["shape"] == [3], queued
        messages = await receive_run(ws, queued["prompt_id"])
        cells = [m["data"] for m in messages if m["type"] == "sweep_cell"]
        assert sorted(c["index"] for c in cells) == [0, 1, 2] and [c["done"] for c in cells] == [1, 2, 3]
        assert [m["type"] for m in messages].count("execution_start") == 1, "one start for the whole sweep"
        assert messages[-2]["type"] == "execution_success"
        history = await server.wait_done(queued["prompt_id"])
        outputs = history["outputs"]["sweep"]
        assert len(outputs["cells"]) == 6, "SaveImage's and PreviewImage's image, of each of the 3 cells"
        assert [g["filename"] for g in outputs["images"]] == ["grid.png"]
        assert outputs["cells"][0]["subfolder"].startswith("sweeps/workflow-")
        assert outputs["failed"] == []
        grid = outputs["images"][0]
        view = await server.client.get("/api/view", params=grid)
        assert view.status == 200 and (await view.read()).startswith(b"\x89PNG")
        assert not list((server.rt.folders.output_dir).glob("test_*.png")), "the workflow's SaveImage did not run"
        await ws.close()


async def test_a_sweep_with_bad_cells_is_refused_naming_each(serve, helpers):
    async with serve() as server:
        resp = await server.client.post("/api/loraloom/sweep", json={
            "prompt": helpers.image_prompt(), "axes": {"1.value": [1, 5000, 6000]}})
        body = await resp.json()
        assert resp.status == 400 and body["error"]["extra_info"]["cells"] == [1, 2], body
        details = [e["details"] for e in body["node_errors"]["1"]["errors"]]
        assert any("cell 1 [1] (1.value=5000)" in d for d in details) and any("cell 2" in d for d in details)
        resp = await server.client.post("/api/loraloom/sweep", json={"prompt": helpers.image_prompt(),
                                                                      "axes": ["9.value=1"]})
        assert resp.status == 400 and "no node 9" in (await resp.json())["error"]["details"]
        resp = await server.client.post("/api/loraloom/sweep", json={"prompt": helpers.image_prompt(), "axes": 5})
        assert resp.status == 400 and "expected a list of axes" in (await resp.json())["error"]["details"]
