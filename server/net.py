"""The connection side of the server: listening with bounded connections and timeouts, and a log
that an attacker cannot flood.

aiohttp closes a connection that sends nothing within ``keepalive_timeout`` of connecting or of its
last response, and that deadline is not moved by partial data (aiohttp 3.9+: the keep-alive check
runs from connection start while the handler waits for a request head), so it is our header read
timeout. A request body is read under its own timeout in the security middleware. aiohttp has no
connection limit, so :class:`ConnectionCap` wraps its protocol factory: above the cap, the oldest
connection that is not inside a request handler is closed to make room, so idle and half-sent
connections can never take every file descriptor (each costs one) from the clients that talk.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import threading
import time
from dataclasses import dataclass

from aiohttp import web

from .security import ServerConfigError

log = logging.getLogger("loraloom.server")

BACKLOG = 128  # asyncio accepts up to this many connections in one go, before closed ones are freed
# Descriptors kept free beyond the connection cap: one accept burst, the queue database, LoRA and
# output files, logs.
FD_RESERVE = BACKLOG + 64
# Loggers whose repeated messages are rate-limited: asyncio logs every failed accept() ("Too many open
# files"), aiohttp every broken request, we every refused one.
NOISY_LOGGERS = ("asyncio", "aiohttp.server", "aiohttp.web", "loraloom.server")


@dataclass(frozen=True)
class Limits:
    """What one client connection may hold. ``header_timeout``: seconds a connection may take to send
    a complete request head (from connecting or from its last response); ``body_timeout``: seconds to
    send a request body; ``max_connections``: open connections (the websocket counts as one)."""

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 256

    def handler_args(self) -> dict:
        """The aiohttp request handler's options for these limits. ``lingering_time``: how long aiohttp
        goes on reading (and dropping) a body the handler refused, before closing."""
        return {"keepalive_timeout": self.header_timeout, "lingering_time": self.header_timeout}


class BusyConnections:
    """Which connections are inside a request handler (``middleware`` marks them); the others are
    waiting for a request and may be closed when the cap is reached."""

    def __init__(self):
        self.busy: dict[object, int] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        protocol = request.protocol
        self.busy[protocol] = self.busy.get(protocol, 0) + 1
        try:
            return await handler(request)
        finally:
            left = self.busy.pop(protocol) - 1
            if left:
                self.busy[protocol] = left


class ConnectionCap:
    """An asyncio protocol factory over aiohttp's ``web.Server``: at most ``limit`` connections; a new
    one over the limit closes the oldest idle one (or itself when every connection is busy)."""

    def __init__(self, server: web.Server, limit: int, busy: BusyConnections):
        self.server = server
        self.limit = limit
        self.busy = busy
        self.evicted = 0

    def __call__(self):
        # Oldest first (aiohttp keeps them in connection order); one closed a moment ago has no transport.
        open_now = [c for c in self.server.connections if c.transport is not None]
        if len(open_now) >= self.limit:
            victim = next((c for c in open_now if c not in self.busy.busy), None)
            if victim is not None:
                self.evicted += 1
                log.warning("%d connections open (the limit): closed the oldest idle one", self.limit)
                victim.force_close()
            else:
                return _Refuse()
        return self.server()


class _Refuse(asyncio.Protocol):
    """Closes a connection at once: every connection is busy and the cap is reached."""

    def connection_made(self, transport):
        log.warning("every connection is busy and the limit is reached: refused a new one")
        transport.abort()


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files towards ``wanted`` (within the hard limit);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class RateLimit(logging.Filter):
    """Lets through at most ``burst`` records of one message template per ``period`` seconds; the next
    one let through says how many were dropped."""

    def __init__(self, burst: int = 5, period: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.period, self.clock = burst, period, clock
        self._seen: dict[tuple, list] = {}  # (logger, template) -> [window start, count, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self.period:
                dropped = entry[2] if entry else 0
                if len(self._seen) > 1000:  # bounded: templates are few, but be safe
                    self._seen.clear()
                self._seen[key] = [now, 1, 0]
                if dropped:
                    record.msg = f"{record.msg} ({dropped} similar messages suppressed)"
                return True
            if entry[1] < self.burst:
                entry[1] += 1
                return True
            entry[2] += 1
            return False


def rate_limit_logs(limit: RateLimit | None = None) -> RateLimit:
    """Install one :class:`RateLimit` on every noisy logger (once); returns it."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        existing = next((f for f in logger.filters if isinstance(f, RateLimit)), None)
        if existing is not None:
            limit = limit or existing
            continue
        limit = limit or RateLimit()
        logger.addFilter(limit)
    return limit


class Listening:
    """A started server: ``port`` (the bound one), ``cap`` (the connection factory); ``close()``."""

    def __init__(self, runner: web.AppRunner, servers: list, cap: ConnectionCap):
        self.runner = runner
        self.servers = servers
        self.cap = cap
        sock = servers[0].sockets[0]
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        await self.runner.cleanup()


LISTEN_ADVICE = "--listen takes an address of this machine, e.g. 127.0.0.1 or ::1"
MAX_PORT = 65535
PRIVILEGED_PORTS = 1024  # below this, binding needs root (or CAP_NET_BIND_SERVICE) on Linux and BSDs
NEARBY_PORTS = 20  # how far above a busy port to look for a free one to suggest


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (bound before anything starts, so a refusal leaves nothing
    running). A port out of range or in use, an address this machine does not have, or any other bind
    failure is a :class:`ServerConfigError` naming the option to change (``--port`` or ``--listen``)."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= MAX_PORT:
        # the socket library would take 70000 as 70000 % 65536 and -1 as a bad service name
        raise ServerConfigError(f"--port {port} is not a port number", value=port, limit=f"0..{MAX_PORT}",
                                kind="bad_port", fix=f"--port N with N from 1 to {MAX_PORT} (0: any free port)")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ServerConfigError(f"--listen {host}: cannot listen there: {exc.strerror}", value=host,
                                kind="cannot_listen", fix=LISTEN_ADVICE) from None
    try:
        return socket.create_server(address, family=family, backlog=BACKLOG)
    except OSError as exc:
        # create_server appends "(while attempting to bind on address ...)" to strerror: say it once
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.EADDRINUSE:
            free = _free_port_near(family, address, port)
            fix = (f"stop that program, or choose another port: --port {free} is free" if free is not None
                   else "stop that program, or choose another port with --port N")
            raise ServerConfigError(f"--port {port}: cannot listen on {shown}: the port is in use by another "
                                    "program", value=port, kind="port_in_use", fix=fix) from None
        if exc.errno == errno.EACCES and 0 < port < PRIVILEGED_PORTS:
            raise ServerConfigError(f"--port {port}: cannot listen on {shown}: {reason} (ports below "
                                    f"{PRIVILEGED_PORTS} need administrator rights)", value=port,
                                    limit=f"{PRIVILEGED_PORTS}..{MAX_PORT}", kind="port_forbidden",
                                    fix="--port N with N above 1023, e.g. the default 8188") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ServerConfigError(f"--listen {host}: cannot listen on {shown}: this machine has no such "
                                    "address", value=host, kind="cannot_listen", fix=LISTEN_ADVICE) from None
        raise ServerConfigError(f"cannot listen on {shown}: {reason}", value=shown, kind="cannot_listen",
                                fix=f"check --listen and --port; {LISTEN_ADVICE}") from None


def _free_port_near(family: int, address: tuple, port: int) -> int | None:
    """The first port above ``port`` (within :data:`NEARBY_PORTS`) that ``address`` can bind now, or
    None. Only a suggestion: another program may take it before the user retries."""
    for candidate in range(port + 1, min(port + 1 + NEARBY_PORTS, MAX_PORT + 1)):
        try:
            with socket.create_server((address[0], candidate, *address[2:]), family=family):
                return candidate
        except OSError:
            continue
    return None


async def start(app: web.Application, busy: BusyConnections, host: str, port: int, limits: Limits) -> Listening:
    """Start ``app`` on ``host:port`` under ``limits`` (see :func:`bind` for the refusals)."""
    sock = bind(host, port)
    rate_limit_logs()
    soft = raise_fd_limit(limits.max_connections + FD_RESERVE)
    cap_limit = max(1, min(limits.max_connections, soft - FD_RESERVE))
    if cap_limit < limits.max_connections:
        log.warning("open-file limit %d allows %d connections, not %d", soft, cap_limit, limits.max_connections)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **limits.handler_args())
    try:
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    cap = ConnectionCap(runner.server, cap_limit, busy)
    server = await asyncio.get_running_loop().create_server(cap, sock=sock)
    return Listening(runner, [server], cap)
