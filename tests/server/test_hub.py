"""The websocket hub on its own aiohttp app: client ids, who gets which message, order across threads,
feature flags, a reconnecting page, a client too far behind, and shutdown."""

import asyncio
import contextlib
import threading

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from loraloom.server import hub as hub_module
from loraloom.server.hub import Hub

FEATURES = {"supports_preview_metadata": False, "max_upload_size": 123}


@contextlib.asynccontextmanager
async def hub_client(status=lambda: {"exec_info": {"queue_remaining": 0}}):
    """A Hub serving ``GET /ws`` on a real aiohttp test server; yields (hub, client)."""
    hub = Hub(status=status, features=FEATURES)
    app = web.Application()
    app.router.add_get("/ws", hub.handle)

    async def attach(app):
        hub.attach(asyncio.get_running_loop())

    async def close(app):
        await hub.close_all()

    app.on_startup.append(attach)
    app.on_shutdown.append(close)
    async with TestClient(TestServer(app)) as client:
        yield hub, client


async def connect(client, sid: str | None = None):
    """A websocket and the sid the hub greeted it with."""
    ws = await client.ws_connect("/ws" + (f"?clientId={sid}" if sid is not None else ""))
    hello = await asyncio.wait_for(ws.receive_json(), timeout=10)
    assert hello["type"] == "status", hello
    return ws, hello["data"]["sid"]


async def until(predicate, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def test_the_greeting_carries_the_status_and_the_client_id():
    async with hub_client(status=lambda: {"exec_info": {"queue_remaining": 3}}) as (hub, client):
        ws = await client.ws_connect("/ws?clientId=page_1-A")
        assert await ws.receive_json() == {"type": "status",
                                           "data": {"status": {"exec_info": {"queue_remaining": 3}}, "sid": "page_1-A"}}
        assert hub.client_ids == ["page_1-A"]
        await ws.close()
        await until(lambda: hub.client_ids == [])


@pytest.mark.parametrize("sid", ["", "bad id!", "a/b", "x" * 65, "%00"])
async def test_an_unusable_client_id_is_replaced_by_a_fresh_one(sid):
    async with hub_client() as (hub, client):
        ws, given = await connect(client, sid)
        assert given != sid and len(given) == 32 and int(given, 16) >= 0, f"{sid!r} -> {given!r}"
        assert hub.client_ids == [given]
        await ws.close()


async def test_messages_reach_the_named_client_or_everyone():
    async with hub_client() as (hub, client):
        (a, _), (b, _) = await connect(client, "a"), await connect(client, "b")
        hub.publish("executing", {"node": "1"}, "a")
        hub.publish("executing", {"node": "2"}, "nobody")  # not connected: dropped
        hub.publish("status", {"status": {"exec_info": {"queue_remaining": 1}}})
        assert await a.receive_json() == {"type": "executing", "data": {"node": "1"}}
        assert (await a.receive_json())["type"] == "status"
        assert (await b.receive_json())["type"] == "status", "b sees only the message for everyone"
        hub.publish("done", {}, "b")
        assert (await b.receive_json())["type"] == "done", "nothing else was queued for b before it"
        await a.close(), await b.close()


async def test_publish_status_asks_for_the_current_status():
    queue = {"n": 0}
    async with hub_client(status=lambda: {"exec_info": {"queue_remaining": queue["n"]}}) as (hub, client):
        ws, _ = await connect(client, "s")
        queue["n"] = 4
        hub.publish_status()
        assert await ws.receive_json() == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 4}}}}
        await ws.close()


async def test_messages_from_other_threads_arrive_in_order():
    async with hub_client() as (hub, client):
        ws, _ = await connect(client, "t")
        def worker():
            for i in range(500):
                hub.publish("progress", {"value": i, "max": 500}, "t")

        await asyncio.to_thread(worker)
        received = [(await asyncio.wait_for(ws.receive_json(), 10))["data"]["value"] for _ in range(500)]
        assert received == list(range(500)), "one client's messages keep the order they were published in"
        await ws.close()


def test_publish_without_a_running_loop_is_a_no_op():
    hub = Hub(status=dict, features={})
    hub.publish("status", {})  # not attached yet: the server has not started
    loop = asyncio.new_event_loop()
    hub.attach(loop)
    loop.close()
    hub.publish("status", {})  # the server stopped: a worker thread finishing late must not raise
    assert hub.client_ids == []


async def test_feature_flags_are_answered_and_other_messages_ignored():
    async with hub_client() as (hub, client):
        ws, _ = await connect(client, "f")
        await ws.send_str("{not json")
        await ws.send_str('{"type": "feature_flags", "type": "twice"}')
        await ws.send_json(["not", "an", "object"])
        await ws.send_json({"type": "something_else"})
        await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        assert await asyncio.wait_for(ws.receive_json(), 10) == {"type": "feature_flags", "data": FEATURES}, \
            "bad messages are ignored, the connection stays open and the next good one is answered"
        await ws.close()


async def test_an_oversized_client_message_closes_that_connection():
    async with hub_client() as (hub, client):
        ws, _ = await connect(client, "big")
        other, _ = await connect(client, "small")
        await ws.send_str("x" * (hub_module.MAX_CLIENT_MESSAGE + 1))
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg
        await until(lambda: hub.client_ids == ["small"])
        hub.publish("still", {}, "small")
        assert (await other.receive_json())["type"] == "still", "other clients are not affected"
        await other.close()


async def test_a_reconnecting_page_replaces_its_old_connection():
    async with hub_client() as (hub, client):
        old, _ = await connect(client, "page")
        new, _ = await connect(client, "page")
        msg = await asyncio.wait_for(old.receive(), 10)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), "the old socket of that id is closed"
        hub.publish("hello", {}, "page")
        assert (await new.receive_json())["type"] == "hello"
        await until(lambda: hub.client_ids == ["page"])
        await new.close()


async def test_a_client_too_far_behind_is_disconnected(monkeypatch):
    monkeypatch.setattr(hub_module, "MAX_BACKLOG", 5)
    async with hub_client() as (hub, client):
        slow, _ = await connect(client, "slow")
        fast, _ = await connect(client, "fast")
        done = threading.Event()

        def burst():  # all scheduled before the loop runs the sender: the backlog builds up at once
            for i in range(20):
                hub.publish("progress", {"value": i}, "slow")
            done.set()

        asyncio.get_running_loop().call_soon(burst)
        await until(done.is_set)
        received = []
        while True:
            msg = await asyncio.wait_for(slow.receive(), 10)
            if msg.type != WSMsgType.TEXT:
                break
            received.append(msg.json()["data"]["value"])
        assert received == list(range(5)), "it gets what fit in its backlog, then is closed"
        assert hub.client_ids == ["fast"], "the slow client is forgotten, the others stay"
        hub.publish("ok", {}, "fast")
        assert (await fast.receive_json())["type"] == "ok"
        await fast.close()


async def test_close_all_closes_every_client():
    async with hub_client() as (hub, client):
        sockets = [(await connect(client, f"c{i}"))[0] for i in range(3)]
        await hub.close_all()
        assert hub.client_ids == []
        for ws in sockets:
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), msg
