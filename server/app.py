"""Assembling and running the server: configuration, the user folder, the frontend's files."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from .hub import Hub
from .net import BusyConnections, Limits, start
from .routes import Api
from .security import SecurityPolicy, ServerConfigError, check_listen, security_middleware
from .store import PromptStore
from .userdata import UserData
from .worker import Worker

log = logging.getLogger("loraloom.server")

ENV_USER_DIR = "LORALOOM_USER_DIR"
ENV_TOKEN = "LORALOOM_SERVE_TOKEN"
DEFAULT_PORT = 8188  # ComfyUI's, so its API clients find this server where they look
LOCK_FILE = "server.lock"
PACKAGE_DIR = Path(__file__).resolve().parents[1]


@dataclass
class ServerConfig:
    """How ``loraloom serve`` runs. ``frontend_dir`` defaults to the comfyui-frontend-package wheel's
    ``static`` folder; ``user_dir`` to :func:`default_user_dir`."""

    listen: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    allow_hosts: tuple[str, ...] = ()
    user_dir: Path | None = None
    frontend_dir: Path | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    limits: Limits = field(default_factory=Limits)
    argv: Sequence[str] | None = None  # the command line /system_stats reports; None: sys.argv
    # where queued sweeps run their cells: "local" (this runtime) or "ray" (actors on a Ray cluster at
    # ray_address; None: a local Ray instance), kept across sweeps so the actors stay warm
    sweep_executor: str = "local"
    ray_address: str | None = None


@dataclass
class ServerState:
    """Everything the routes share; ``app[STATE]``."""

    runtime: object
    store: PromptStore
    worker: Worker
    hub: Hub
    userdata: UserData
    frontend_dir: Path | None
    user_dir: Path
    features: dict = field(default_factory=dict)
    lock: "UserDirLock | None" = None
    busy: BusyConnections = field(default_factory=BusyConnections)
    argv: list[str] = field(default_factory=list)


STATE = web.AppKey("loraloom_state", ServerState)


def default_user_dir(env=None) -> Path:
    """``LORALOOM_USER_DIR``, else ``$XDG_DATA_HOME/loraloom``, else ``~/.local/share/loraloom``."""
    env = os.environ if env is None else env
    if env.get(ENV_USER_DIR):
        return Path(env[ENV_USER_DIR]).expanduser()
    base = Path(env["XDG_DATA_HOME"]).expanduser() if env.get("XDG_DATA_HOME") else Path.home() / ".local" / "share"
    return base / "loraloom"


def reported_argv(argv, token: str | None) -> list[str]:
    """The command line as ``/system_stats`` reports it (ComfyUI reports its ``sys.argv`` there):
    ``argv`` with the token, wherever it appears (``--token T``, ``--token=T``), replaced by
    ``<token>``, since the answer goes to every client."""
    argv = [str(arg) for arg in argv]
    return [arg.replace(token, "<token>") for arg in argv] if token else argv


def find_frontend() -> Path | None:
    """The ``static`` folder of the installed comfyui-frontend-package, or None."""
    spec = importlib.util.find_spec("comfyui_frontend_package")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if (static / "index.html").is_file() else None


def _check_user_dir(user_dir: Path, frontend_dir: Path | None) -> Path:
    user_dir = user_dir.expanduser().absolute()
    for package in [PACKAGE_DIR] + ([frontend_dir.resolve()] if frontend_dir else []):
        if user_dir.resolve().is_relative_to(package):
            raise ServerConfigError(f"user folder {user_dir} is inside the installed package {package}; "
                                    "settings and queues must live elsewhere.", value=str(user_dir),
                                    limit=f"outside {package}", kind="user_dir_in_package",
                                    fix=f"--user-dir DIR or {ENV_USER_DIR}=DIR")
    if user_dir.exists() and not user_dir.is_dir():
        raise ServerConfigError("the user folder is a file, not a folder", file=user_dir,
                                kind="user_dir_not_folder", fix="--user-dir DIR naming a folder (it is created "
                                                                "if missing)")
    try:
        user_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServerConfigError(f"the user folder cannot be created: {exc.strerror}", file=user_dir,
                                kind="user_dir_unusable", fix="--user-dir DIR naming a folder you can write") from None
    return user_dir


class UserDirLock:
    """One server per user folder: an exclusive ``flock`` on ``<user folder>/server.lock``, held while
    the server lives (the kernel drops it when the process dies, so a killed server never leaves a
    stale lock). The file says which process holds it and on which port, for the refusal message."""

    def __init__(self, user_dir: Path, port: int):
        self.path = user_dir / LOCK_FILE
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ServerConfigError(f"cannot create the user folder's lock file: {exc.strerror}",
                                    file=self.path, kind="user_dir_unusable",
                                    fix="--user-dir DIR naming a folder you can write") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").split()
            os.close(self._fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise ServerConfigError(f"cannot lock the user folder: {exc.strerror}",
                                        file=self.path, kind="user_dir_unusable") from None
            who = f"pid {holder[0]}, port {holder[1]}" if len(holder) >= 2 else "pid unknown"
            raise ServerConfigError(f"the user folder is in use by another loraloom serve ({who}); "
                                    "one server per user folder", file=user_dir, value=" ".join(holder) or None,
                                    kind="user_dir_in_use",
                                    fix="use the running server, stop it, or give this one another --user-dir")
        self.record(port)

    def record(self, port: int) -> None:
        """Write this process's pid and ``port`` into the lock file."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()} {port}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def create_app(runtime, config: ServerConfig | None = None) -> web.Application:
    """The aiohttp application over ``runtime`` (its worker starts and stops with the app)."""
    config = config or ServerConfig()
    frontend_dir = Path(config.frontend_dir) if config.frontend_dir else find_frontend()
    user_dir = _check_user_dir(Path(config.user_dir) if config.user_dir else default_user_dir(), frontend_dir)
    lock = UserDirLock(user_dir, config.port)  # before the queue: a live server's running prompt is its own
    try:
        userdata = UserData(user_dir)
        store = PromptStore(user_dir / "queue.sqlite3")
        recovered = store.recover()
    except OSError as exc:
        lock.release()
        raise ServerConfigError(f"the user folder cannot be written: {exc.strerror}", file=exc.filename or user_dir,
                                kind="user_dir_unusable", fix="--user-dir DIR naming a folder you can write") from None
    except BaseException:
        lock.release()
        raise
    if recovered:
        log.warning("marked %d prompt(s) that were running when the server stopped as interrupted", len(recovered))
    features = {"supports_preview_metadata": False, "max_upload_size": config.max_body_bytes}
    hub = Hub(status=lambda: {"exec_info": {"queue_remaining": store.remaining()}}, features=features)
    worker = Worker(runtime, store, hub, sweep_executor=config.sweep_executor, ray_address=config.ray_address)
    state = ServerState(runtime, store, worker, hub, userdata, frontend_dir, user_dir, features, lock,
                        argv=reported_argv(sys.argv if config.argv is None else config.argv, config.token))

    policy = SecurityPolicy(token=config.token, allow_hosts=frozenset(h.lower() for h in config.allow_hosts),
                            max_body_bytes=config.max_body_bytes, body_timeout=config.limits.body_timeout)
    app = web.Application(middlewares=[state.busy.middleware, security_middleware(policy)],
                          client_max_size=config.max_body_bytes)
    app[STATE] = state
    Api(state).add_routes(app)

    async def start(app):
        hub.attach(asyncio.get_running_loop())
        worker.start()

    async def close_sockets(app):
        await hub.close_all()

    async def stop(app):
        worker.stop()
        store.close()
        lock.release()

    app.on_startup.append(start)
    app.on_shutdown.append(close_sockets)
    app.on_cleanup.append(stop)
    return app


def listen_address(listen: str) -> str:
    """``--listen`` as a socket address: ``[::1]`` (as in a URL) is ``::1``."""
    return listen[1:-1] if listen.startswith("[") and listen.endswith("]") else listen


async def start_server(app: web.Application, config: ServerConfig):
    """Listen for ``app`` as ``config`` says (limits included); returns the started
    :class:`~loraloom.server.net.Listening` (``port``, ``close()``)."""
    listening = await start(app, app[STATE].busy, listen_address(config.listen), config.port, config.limits)
    if app[STATE].lock is not None:
        app[STATE].lock.record(listening.port)
    return listening


def serve(runtime, config: ServerConfig) -> None:
    """Run the server until SIGINT or SIGTERM (``loraloom serve``)."""
    check_listen(config.listen, config.token)
    app = create_app(runtime, config)
    asyncio.run(_serve(app, config))


async def _serve(app: web.Application, config: ServerConfig) -> None:
    state = app[STATE]
    try:
        listening = await start_server(app, config)
    except BaseException:
        state.lock.release()  # nothing started: the worker starts once the port is ours
        state.store.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    listen = listen_address(config.listen)
    host = f"[{listen}]" if ":" in listen else listen
    url = f"http://{host}:{listening.port}/"
    print(f"LoRA Loom editor: {url}" + ("?token=<your token>" if config.token else ""), flush=True)
    print(f"user folder: {state.user_dir}", flush=True)
    if state.frontend_dir is None:
        print("the visual editor is not installed (pip install 'loraloom[editor]'); serving the API only", flush=True)
    try:
        await stop.wait()
    finally:
        await listening.close()
