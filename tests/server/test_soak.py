"""The server held against idle, half-sent and slow connections (loopback only, bounded in sockets and
time): it keeps answering, closes what sends nothing in time, never holds more connections than its
cap, and its log cannot be flooded."""

import asyncio
import contextlib
import logging
import socket
import time

import pytest

from loraloom.server import ServerConfig, create_app
from loraloom.server.app import start_server
from loraloom.server.net import Limits, RateLimit

SOCKETS = 200
LIMITS = Limits(header_timeout=1.0, body_timeout=1.0, max_connections=50)


@contextlib.asynccontextmanager
async def listening(make_runtime, tmp_path, frontend, listen="127.0.0.1", limits=LIMITS):
    """The real ``serve`` path (bind, limits, cap) on a free loopback port."""
    config = ServerConfig(listen=listen, port=0, user_dir=tmp_path / "user", frontend_dir=frontend, limits=limits)
    app = create_app(make_runtime(), config)
    server = await start_server(app, config)
    try:
        yield server
    finally:
        await server.close()


async def request(port: int, head: bytes, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """Send one complete request; the whole answer (the connection is closed by the request)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closes this connection within ``within`` s (what it sent before is skipped)."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
        return True
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


async def test_idle_and_half_sent_connections_neither_starve_clients_nor_stay_open(make_runtime, tmp_path, frontend):
    async with listening(make_runtime, tmp_path, frontend) as server:
        conns = []
        for i in range(SOCKETS):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            if i % 2:  # half send a partial request head and then nothing
                writer.write(b"GET /api/prompt HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            conns.append((reader, writer))
        await asyncio.sleep(0.1)
        assert len(server.runner.server.connections) <= LIMITS.max_connections, "the connection cap holds"

        started = time.monotonic()
        answer = await request(server.port, get("/api/prompt"))
        assert answer.startswith(b"HTTP/1.1 200"), f"a normal request is answered: {answer[:80]!r}"
        assert time.monotonic() - started < 3.0, "and promptly, with 200 idle sockets open"

        results = await asyncio.gather(*(closed_by_server(r, LIMITS.header_timeout + 4.0) for r, _ in conns))
        assert all(results), f"{results.count(False)} idle sockets were still open after the header timeout"
        for _, writer in conns:
            writer.close()
        answer = await request(server.port, get("/api/prompt"))
        assert answer.startswith(b"HTTP/1.1 200"), "still answering after the soak"


async def test_a_trickled_request_head_is_closed_at_the_header_timeout(make_runtime, tmp_path, frontend):
    async with listening(make_runtime, tmp_path, frontend) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        closed = False
        try:
            for _ in range(40):  # one header byte every 0.1 s: activity, but never a complete head
                writer.write(b"GET /api/prompt HTTP/1.1\r\nX-A: a\r\n" if _ == 0 else b"a")
                await writer.drain()
                if await closed_by_server(reader, 0.1):
                    closed = True
                    break
        except (ConnectionError, OSError):
            closed = True
        finally:
            writer.close()
        assert closed, "a head trickled byte by byte stays open for ever"
        assert time.monotonic() - started < LIMITS.header_timeout + 2.0


async def test_a_slow_body_is_refused_at_the_body_timeout(make_runtime, tmp_path, frontend):
    async with listening(make_runtime, tmp_path, frontend) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /api/settings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"a\": ")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), LIMITS.body_timeout + 5.0)
        assert head.startswith(b"HTTP/1.1 408"), head[:200]
        assert await closed_by_server(reader, LIMITS.header_timeout + 4.0), "and the connection is closed"
        writer.close()


async def test_busy_connections_are_not_evicted(make_runtime, tmp_path, frontend):
    """At the cap, idle connections make room; a websocket (inside its handler) keeps its place."""
    import aiohttp

    limits = Limits(header_timeout=30.0, body_timeout=30.0, max_connections=5)
    async with listening(make_runtime, tmp_path, frontend, limits=limits) as server:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{server.port}/ws") as ws:
                await asyncio.wait_for(ws.receive_json(), 10)  # the first status: the handler is running
                idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(10)]
                answer = await request(server.port, get("/api/prompt"))
                assert answer.startswith(b"HTTP/1.1 200")
                assert not ws.closed, "the websocket was closed to make room"
                assert server.cap.evicted >= 6
                for _, writer in idle:
                    writer.close()


async def test_listen_on_ipv6_loopback(make_runtime, tmp_path, frontend):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    async with listening(make_runtime, tmp_path, frontend, listen="[::1]") as server:
        answer = await request(server.port, b"GET /api/prompt HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n",
                               host="::1")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_repeated_log_messages_are_rate_limited():
    now = [0.0]
    limit = RateLimit(burst=5, period=10.0, clock=lambda: now[0])
    logger = logging.getLogger("loraloom.test_soak")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    logger.addFilter(limit)
    logger.propagate = False
    try:
        for i in range(1000):
            logger.warning("socket.accept() out of system resource: %s", i)
        logger.warning("another message")
        assert len(records) == 6, "5 of one template per period, and the other message"
        now[0] = 10.0
        logger.warning("socket.accept() out of system resource: %s", "again")
        assert records[-1] == "socket.accept() out of system resource: again (995 similar messages suppressed)"
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(limit)
