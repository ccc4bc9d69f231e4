"""The queue through the API: order, persistence across a restart, parallel submissions, cancelling
(never the next prompt), and a failing prompt leaving the worker and the cache healthy. The worker's
own cancel races are in test_worker.py."""

import asyncio

from loraloom.server.store import PromptStore


async def queue_ids(server) -> tuple[list[str], list[str]]:
    data = await (await server.client.get("/api/queue")).json()
    return [i[1] for i in data["queue_running"]], [i[1] for i in data["queue_pending"]]


async def test_prompts_run_in_order_and_front_jumps_the_queue(serve, helpers, gates):
    async with serve() as server:
        first = (await server.submit(helpers.chain(1, gate="first")))["prompt_id"]
        await server.wait_running(first)
        b = (await server.submit(helpers.chain(2)))
        c = (await server.submit(helpers.chain(3)))
        d = (await server.submit(helpers.chain(4), front=True))
        assert d["number"] < 0 < b["number"] < c["number"], "front gets ComfyUI's negative number"
        running, pending = await queue_ids(server)
        assert running == [first] and pending == [d["prompt_id"], b["prompt_id"], c["prompt_id"]]
        queue = await (await server.client.get("/api/queue")).json()
        number, prompt_id, prompt, extra, outputs = queue["queue_pending"][1]
        assert (prompt_id, prompt["1"]["inputs"]["value"], outputs) == (b["prompt_id"], 2, ["5"])
        assert (await (await server.client.get("/prompt")).json()) == {"exec_info": {"queue_remaining": 4}}
        gates("first").set()
        for prompt_id in (c["prompt_id"], first):
            await server.wait_done(prompt_id)
        assert server.started == [first, d["prompt_id"], b["prompt_id"], c["prompt_id"]]


async def test_parallel_submissions_get_unique_ids_and_run_exactly_once(serve, helpers):
    async with serve() as server:
        answers = await asyncio.gather(*(server.submit(helpers.chain(i)) for i in range(24)))
        ids = [a["prompt_id"] for a in answers]
        numbers = [a["number"] for a in answers]
        assert len(set(ids)) == 24 and len(set(numbers)) == 24, "every submission gets its own id and number"
        for prompt_id in ids:
            entry = await server.wait_done(prompt_id)
            assert entry["status"]["status_str"] == "success"
        assert sorted(server.started) == sorted(ids), "each prompt ran exactly once"


async def test_a_failing_prompt_leaves_the_worker_and_cache_healthy(serve, helpers):
    async with serve() as server:
        ws = await server.client.ws_connect("/ws?clientId=c1")
        good = (await server.submit(helpers.chain(7), client_id="c1"))["prompt_id"]
        await server.wait_done(good)
        bad = (await server.submit(helpers.chain(7, fail=True), client_id="c1"))["prompt_id"]
        entry = await server.wait_done(bad)
        assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
        error = [data for name, data in entry["status"]["messages"] if name == "execution_error"][0]
        assert (error["node_id"], error["node_type"]) == ("4", "MaybeFail")
        assert error["exception_message"] == "RuntimeError: asked to fail" and error["traceback"]
        assert error["extra_info"] == {}, "the key ComfyUI's page ignores is there; a RuntimeError has no fields"
        seen = []
        while not seen or seen[-1] != ("executing", None, bad):
            msg = await asyncio.wait_for(ws.receive_json(), timeout=10)
            if msg["type"] != "status":
                data = msg["data"]
                seen.append((msg["type"], data.get("node", data.get("node_id")), data["prompt_id"]))
        assert ("execution_error", "4", bad) in seen, "the page is told which node failed"

        again = (await server.submit(helpers.chain(7), client_id="c1"))["prompt_id"]
        entry = await server.wait_done(again)
        assert entry["status"]["status_str"] == "success", "the worker runs the next prompt"
        cached = [data for name, data in entry["status"]["messages"] if name == "execution_cached"]
        assert cached and cached[0]["nodes"] == ["5"], "the cache still holds the good prompt's results"
        await ws.close()


async def test_cancel_a_pending_prompt_and_interrupt_the_running_one(serve, helpers, gates):
    async with serve() as server:
        ws = await server.client.ws_connect("/ws?clientId=c2")
        running = (await server.submit(helpers.chain(1, gate="a"), client_id="c2"))["prompt_id"]
        await server.wait_running(running)
        pending = (await server.submit(helpers.chain(2)))["prompt_id"]
        resp = await server.client.post("/api/queue", json={"delete": [pending]})
        assert (await resp.json())["deleted"] == [pending]
        assert (await server.client.get(f"/api/history/{pending}")).status == 404, "a cancelled prompt is gone"

        assert (await (await server.client.post("/api/interrupt", json={"prompt_id": "other"})).json()) == \
            {"interrupted": None}, "an interrupt naming another prompt does nothing"
        resp = await server.client.post("/api/interrupt", json={"prompt_id": running})
        assert (await resp.json()) == {"interrupted": running}
        entry = await server.wait_done(running)
        assert entry["status"]["status_str"] == "error"
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
        kinds = []
        while kinds[-1:] != [("executing", None)]:
            msg = await asyncio.wait_for(ws.receive_json(), timeout=10)
            kinds.append((msg["type"], msg["data"].get("node")))
        assert kinds[-2:] == [("execution_interrupted", None), ("executing", None)], kinds
        jobs = await (await server.client.get("/api/jobs?status=cancelled")).json()
        assert [j["id"] for j in jobs["jobs"]] == [running]
        await ws.close()


async def test_interrupt_without_an_id_and_clear(serve, helpers, gates):
    async with serve() as server:
        running = (await server.submit(helpers.chain(1, gate="b")))["prompt_id"]
        await server.wait_running(running)
        for i in range(3):
            await server.submit(helpers.chain(10 + i))
        resp = await server.client.post("/queue", json={"clear": True})
        assert len((await resp.json())["deleted"]) == 3
        assert (await queue_ids(server)) == ([running], [])
        resp = await server.client.post("/interrupt", headers={"Content-Type": "application/json"})
        assert (await resp.json()) == {"interrupted": running}
        assert (await server.wait_done(running))["status"]["messages"][-1][0] == "execution_interrupted"


async def test_a_late_cancel_never_kills_the_next_prompt(serve, helpers, gates):
    async with serve() as server:
        first = (await server.submit(helpers.chain(1)))["prompt_id"]
        second = (await server.submit(helpers.chain(2, gate="second")))["prompt_id"]
        await server.wait_done(first)
        await server.wait_running(second)
        for body in ({"prompt_id": first},):
            assert (await (await server.client.post("/api/interrupt", json=body)).json()) == {"interrupted": None}
        resp = await server.client.post("/api/queue", json={"delete": [first]})
        assert (await resp.json()) == {"deleted": [], "interrupted": []}
        resp = await server.client.post(f"/api/jobs/{first}/cancel", json={})
        assert (await resp.json())["result"] == "finished"
        await asyncio.sleep(0.05)
        assert server.state.worker.running_id == second
        gates("second").set()
        assert (await server.wait_done(second))["status"]["status_str"] == "success"


async def test_a_restart_keeps_pending_prompts_and_marks_the_running_one_interrupted(serve, helpers, gates, tmp_path):
    async with serve() as server:
        running = (await server.submit(helpers.chain(1, gate="never")))["prompt_id"]
        await server.wait_running(running)
        pending = [(await server.submit(helpers.chain(i)))["prompt_id"] for i in (2, 3)]
    async with serve() as server:  # same user folder
        for prompt_id in pending:
            assert (await server.wait_done(prompt_id))["status"]["status_str"] == "success"
        entry = await server.wait_done(running)
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
        assert server.started == pending


async def test_a_crash_while_running_is_recovered_at_start(serve, helpers, tmp_path):
    store = PromptStore(tmp_path / "user" / "queue.sqlite3")
    store.add("crashed", helpers.chain(1), {"client_id": None, "create_time": 1}, ["5"])
    store.add("waiting", helpers.chain(2), {"client_id": None, "create_time": 2}, ["5"])
    assert store.claim_next().prompt_id == "crashed"
    store.close()  # the process died here: 'crashed' is still marked running
    async with serve() as server:
        entry = await server.wait_done("crashed")
        assert entry["status"] == {"status_str": "error", "completed": False,
                                   "messages": entry["status"]["messages"]}
        assert entry["status"]["messages"][0][0] == "execution_interrupted"
        assert (await server.wait_done("waiting"))["status"]["status_str"] == "success"
        assert server.started == ["waiting"], "the interrupted prompt is not run again"
        assert (await server.client.get("/api/history/never-queued")).status == 404
        numbers = [(await server.submit(helpers.chain(5)))["number"] for _ in range(2)]
        assert min(numbers) > 1, "numbers keep counting after a restart"


async def test_a_second_server_on_the_same_user_folder_is_refused_and_touches_nothing(serve, helpers, gates,
                                                                                     make_runtime, tmp_path):
    import os

    import pytest

    from loraloom.server import ServerConfig, ServerConfigError, create_app

    async with serve(port=8765) as server:
        running = (await server.submit(helpers.chain(1, gate="live")))["prompt_id"]
        await server.wait_running(running)
        with pytest.raises(ServerConfigError) as refused:
            create_app(make_runtime(), ServerConfig(user_dir=tmp_path / "user", port=9999))
        message = str(refused.value)
        assert str(tmp_path / "user") in message and f"pid {os.getpid()}, port 8765" in message, message
        assert refused.value.kind == "user_dir_in_use" and "--user-dir" in message
        assert server.state.store.get(running).status == "running", "the live server's prompt was marked"
        gates("live").set()
        await server.wait_done(running)
    # the lock goes with the server
    async with serve() as server:
        assert server.state.store.get(running).status == "success"
