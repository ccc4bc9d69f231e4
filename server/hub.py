"""The websocket hub: the open ``/ws`` clients by session id, and delivery of ComfyUI's messages.

Messages are ``{"type": ..., "data": {...}}`` JSON text frames. :meth:`Hub.publish` may be called
from any thread (the worker runs prompts in its own); each client has its own queue and sender
task, so messages reach a client in the order they were published.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from typing import Callable

from aiohttp import WSMsgType, web

from ..graph_runtime.errors import WorkflowError
from ..graph_runtime.jsonio import loads_strict

log = logging.getLogger("loraloom.server")

_SID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_BACKLOG = 10_000  # messages waiting for one client; a client that far behind is disconnected
MAX_CLIENT_MESSAGE = 64 * 1024


class _Client:
    def __init__(self, sid: str, ws: web.WebSocketResponse):
        self.sid = sid
        self.ws = ws
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()


class Hub:
    """Open websocket clients. ``status`` returns the current ``status`` payload (queue length);
    ``features`` are the server feature flags sent in answer to the client's own."""

    def __init__(self, status: Callable[[], dict], features: dict):
        self._status = status
        self._features = features
        self._clients: dict[str, _Client] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def client_ids(self) -> list[str]:
        return list(self._clients)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver on this event loop (the server's)."""
        self._loop = loop

    def publish(self, type_: str, data: dict, sid: str | None = None) -> None:
        """Send a message to client ``sid`` (dropped if it is not connected) or, with None, to all.
        Safe to call from any thread."""
        if self._loop is None or self._loop.is_closed():
            return
        text = json.dumps({"type": type_, "data": data}, default=str)
        try:
            self._loop.call_soon_threadsafe(self._deliver, text, sid)
        except RuntimeError:  # the loop closed between the check and the call (shutdown)
            pass

    def publish_status(self) -> None:
        """Tell every client the queue changed (ComfyUI's ``status`` message)."""
        self.publish("status", {"status": self._status()})

    def _deliver(self, text: str, sid: str | None) -> None:
        targets = list(self._clients.values()) if sid is None else [c for c in [self._clients.get(sid)] if c]
        for client in targets:
            if client.queue.qsize() >= MAX_BACKLOG:
                log.warning("websocket client %s is %d messages behind; disconnecting it", client.sid, MAX_BACKLOG)
                client.queue.put_nowait(None)
                self._clients.pop(client.sid, None)
                continue
            client.queue.put_nowait(text)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """The ``GET /ws`` handler (after the security middleware accepted the upgrade)."""
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_CLIENT_MESSAGE)
        await ws.prepare(request)
        sid = request.query.get("clientId", "")
        if not _SID_RE.match(sid):
            sid = uuid.uuid4().hex
        client = _Client(sid, ws)
        previous = self._clients.pop(sid, None)
        if previous is not None:
            previous.queue.put_nowait(None)
        self._clients[sid] = client
        sender = asyncio.create_task(self._send_loop(client))
        client.queue.put_nowait(json.dumps({"type": "status", "data": {"status": self._status(), "sid": sid}}))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._on_client_message(client, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    log.warning("websocket %s closed with %s", sid, ws.exception())
        finally:
            if self._clients.get(sid) is client:
                del self._clients[sid]
            sender.cancel()
        return ws

    def _on_client_message(self, client: _Client, text: str) -> None:
        try:
            message = loads_strict(text, source="websocket message", max_bytes=MAX_CLIENT_MESSAGE)
        except WorkflowError:
            return
        if isinstance(message, dict) and message.get("type") == "feature_flags":
            client.queue.put_nowait(json.dumps({"type": "feature_flags", "data": self._features}))

    async def _send_loop(self, client: _Client) -> None:
        while True:
            text = await client.queue.get()
            if text is None:
                await client.ws.close()
                return
            try:
                await client.ws.send_str(text)
            except (ConnectionError, RuntimeError) as exc:
                log.debug("websocket %s: send failed: %s", client.sid, exc)
                return

    async def close_all(self) -> None:
        """Close every client (server shutdown)."""
        for client in list(self._clients.values()):
            await client.ws.close()
        self._clients.clear()
