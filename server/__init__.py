"""``loraloom serve``: the visual editor (ComfyUI's own web frontend) over a ComfyUI-compatible HTTP +
websocket API, running workflows on the same Runtime as the CLI. Needs the ``editor`` extra (aiohttp,
comfyui-frontend-package).

Modules: ``app`` (configuration, assembly, running), ``routes`` (the HTTP API), ``store`` (the SQLite
queue and history), ``worker`` (the thread that runs prompts), ``hub`` (websocket clients),
``security`` (listen rule and request checks), ``userdata`` (settings and saved files), ``net``
(listening: connection cap, timeouts, log rate limit).
"""

from .app import ServerConfig, ServerState, STATE, create_app, default_user_dir, find_frontend, serve
from .net import Limits
from .security import ServerConfigError, check_listen

__all__ = ["STATE", "Limits", "ServerConfig", "ServerConfigError", "ServerState", "check_listen", "create_app",
           "default_user_dir", "find_frontend", "serve"]
