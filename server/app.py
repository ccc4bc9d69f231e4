"""Assembling and running the server: configuration, the user folder, the frontend's files."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from .hub import Hub
from .routes import Api
from .security import SecurityPolicy, ServerConfigError, check_listen, security_middleware
from .store import PromptStore
from .userdata import UserData
from .worker import Worker

log = logging.getLogger("loraloom.server")

ENV_USER_DIR = "LORALOOM_USER_DIR"
ENV_TOKEN = "LORALOOM_SERVE_TOKEN"
DEFAULT_PORT = 8188  # ComfyUI's, so its API clients find this server where they look
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


STATE = web.AppKey("loraloom_state", ServerState)


def default_user_dir(env=None) -> Path:
    """``LORALOOM_USER_DIR``, else ``$XDG_DATA_HOME/loraloom``, else ``~/.local/share/loraloom``."""
    env = os.environ if env is None else env
    if env.get(ENV_USER_DIR):
        return Path(env[ENV_USER_DIR]).expanduser()
    base = Path(env["XDG_DATA_HOME"]).expanduser() if env.get("XDG_DATA_HOME") else Path.home() / ".local" / "share"
    return base / "loraloom"


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
    return user_dir


def create_app(runtime, config: ServerConfig | None = None) -> web.Application:
    """The aiohttp application over ``runtime`` (its worker starts and stops with the app)."""
    config = config or ServerConfig()
    frontend_dir = Path(config.frontend_dir) if config.frontend_dir else find_frontend()
    user_dir = _check_user_dir(Path(config.user_dir) if config.user_dir else default_user_dir(), frontend_dir)
    store = PromptStore(user_dir / "queue.sqlite3")
    recovered = store.recover()
    if recovered:
        log.warning("marked %d prompt(s) that were running when the server stopped as interrupted", len(recovered))
    features = {"supports_preview_metadata": False, "max_upload_size": config.max_body_bytes}
    hub = Hub(status=lambda: {"exec_info": {"queue_remaining": store.remaining()}}, features=features)
    worker = Worker(runtime, store, hub)
    state = ServerState(runtime, store, worker, hub, UserData(user_dir), frontend_dir, user_dir, features)

    policy = SecurityPolicy(token=config.token, allow_hosts=frozenset(h.lower() for h in config.allow_hosts),
                            max_body_bytes=config.max_body_bytes)
    app = web.Application(middlewares=[security_middleware(policy)], client_max_size=config.max_body_bytes)
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

    app.on_startup.append(start)
    app.on_shutdown.append(close_sockets)
    app.on_cleanup.append(stop)
    return app


def serve(runtime, config: ServerConfig) -> None:
    """Run the server until interrupted (``loraloom serve``)."""
    check_listen(config.listen, config.token)
    app = create_app(runtime, config)
    state = app[STATE]
    host = f"[{config.listen}]" if ":" in config.listen else config.listen
    url = f"http://{host}:{config.port}/"
    print(f"LoRA Loom editor: {url}" + ("?token=<your token>" if config.token else ""), flush=True)
    print(f"user folder: {state.user_dir}", flush=True)
    if state.frontend_dir is None:
        print("the visual editor is not installed (pip install 'loraloom[editor]'); serving the API only", flush=True)
    web.run_app(app, host=config.listen, port=config.port, print=None, access_log=None)
