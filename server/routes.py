"""The HTTP routes: the part of ComfyUI's API that its web frontend and API clients use.

Every API route answers both with and without the ``/api`` prefix, as ComfyUI's do. Request bodies
are parsed with the runtime's strict JSON reader; nothing a request sends is evaluated.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import os
import platform
import re
import sys
import time
import uuid

from aiohttp import web

from ..api import SHIPPED_WORKFLOWS
from ..graph_runtime.errors import LoomError, PathError, ValidationError, WorkflowError
from ..graph_runtime.jsonio import loads_strict
from ..graph_runtime.paths import TEMP_SUBFOLDER, resolve_under
from ..graph_runtime.workflow import locate_in_workflow
from ..nodes import WEB_DIR
from .security import error_body
from .store import ERROR, INTERRUPTED, PENDING, RUNNING, SUCCESS, DuplicateId, JobRow, QueueItem
from .userdata import Conflict
from .worker import DELETED, INTERRUPTING, SWEEP_KEY, UNKNOWN

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TEMPLATE_INDEX_RE = re.compile(r"^index(\.[A-Za-z_-]{1,16})?\.json$")
TEMPLATE_MODULE = "loraloom"  # the shipped workflows' section in the editor's template browser
_TEMPLATE_FILE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\.(json|jpg)")
# Served inline; anything else under /view is a download (``attachment``). No SVG: it can hold script.
INLINE_IMAGES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                 ".gif": "image/gif"}
JOB_STATUS = {PENDING: "pending", RUNNING: "in_progress", SUCCESS: "completed", ERROR: "failed",
              INTERRUPTED: "cancelled"}
MAX_JOBS_PAGE = 1000
EXTENSIONS_URL = "/extensions/loraloom"  # where ComfyUI serves a pack's WEB_DIRECTORY: /extensions/<pack folder>
SQLITE_MAX_INT = 2**63 - 1  # the largest number a query's LIMIT or OFFSET can carry into SQLite
# Settings this server answers while the user has not set them. The frontend's "version updates" ask
# ComfyUI's release service (a request beyond this server) about ComfyUI's releases, which are not
# this server's; ComfyUI skips them when its argv holds --disable-api-nodes, ours is the real one.
DEFAULT_SETTINGS = {"Comfy.Notification.ShowVersionUpdates": False}


def _error(status: int, kind: str, message: str, details: str = "", node_errors: dict | None = None,
           cause: LoomError | None = None):
    body = error_body(kind, message, details, cause)
    if node_errors is not None:  # the prompt routes' shape
        body["node_errors"] = node_errors
    return web.json_response(body, status=status)


def _bad_request(kind: str, message: str, cause: LoomError | None = None) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps(error_body(kind, message, cause=cause)),
                              content_type="application/json")


async def _read_json(request: web.Request, *, empty=None, locate=None):
    """The request body as strict JSON (``empty`` when there is none); 400 when it is not. ``locate``
    names where in the document a non-finite number is (see ``loads_strict``)."""
    data = await request.read()
    if not data.strip():
        return empty
    try:
        return loads_strict(data, source="request body", locate=locate)
    except WorkflowError as exc:
        raise _bad_request("invalid_json", str(exc), exc) from None


def _file_errors(handler):
    """A name refused by the path rules is 400, an existing destination 409, bad JSON content 400."""

    @functools.wraps(handler)
    async def wrapped(self, request):
        try:
            return await handler(self, request)
        except Conflict as exc:
            return _error(409, "exists", str(exc), cause=exc)
        except (PathError, WorkflowError) as exc:
            return _error(400, "bad_path", str(exc), cause=exc)

    return wrapped


def _flag(request: web.Request, name: str, default: bool = False) -> bool:
    value = request.query.get(name)
    return default if value is None else value.lower() in ("1", "true", "yes")


def _int_query(request: web.Request, name: str, default: int | None, low: int = 0, high: int = SQLITE_MAX_INT):
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise _bad_request("bad_query", f"{name}={value!r} is not an integer") from None
    if number < low or (high is not None and number > high):
        raise _bad_request("bad_query", f"{name}={number} is outside {low}..{high}")
    return number


def _ids(value, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad_request("invalid_request", f"'{what}' must be a list of prompt id strings")
    return value


def _prompt_body_problems(body: dict) -> list[str]:
    """What is wrong with the fields of a ``POST /prompt`` body beside the prompt itself."""
    problems = []
    if not isinstance(body.get("extra_data", {}), dict):
        problems.append("'extra_data' must be an object")
    for key in ("client_id", "prompt_id"):
        value = body.get(key)
        if value is not None and not (isinstance(value, str) and _ID_RE.match(value)):
            problems.append(f"'{key}' must be a string of at most 64 letters, digits, '-' or '_'")
    targets = body.get("partial_execution_targets")
    if targets is not None and not (isinstance(targets, list) and all(
            isinstance(t, (str, int)) and not isinstance(t, bool) for t in targets)):
        problems.append("'partial_execution_targets' must be a list of node ids")
    return problems


def _history_entry(item: QueueItem) -> dict:
    outputs = item.result or {}
    return {
        "prompt": item.as_tuple(),
        "outputs": outputs,
        "status": {"status_str": "success" if item.status == SUCCESS else "error",
                   "completed": item.status == SUCCESS, "messages": item.messages or []},
        "meta": {nid: {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                 for nid in outputs},
    }


def _job_row(item: QueueItem) -> JobRow:
    workflow = (item.extra_data.get("extra_pnginfo") or {}).get("workflow")
    workflow_id = workflow.get("id") if isinstance(workflow, dict) else None
    return JobRow(item.number, item.prompt_id, item.status, item.result, item.messages,
                  item.extra_data.get("create_time", 0), workflow_id if isinstance(workflow_id, str) else None)


def _job(item: JobRow, detail: QueueItem | None = None) -> dict:
    """One prompt as the frontend's jobs API lists it (``detail``: the whole prompt, for one job)."""
    job = {"id": item.prompt_id, "status": JOB_STATUS[item.status], "priority": item.number,
           "create_time": item.create_time, "outputs_count": 0}
    if item.workflow_id is not None:
        job["workflow_id"] = item.workflow_id
    for name, data in item.messages or []:
        if name == "execution_start":
            job["execution_start_time"] = data.get("timestamp")
        elif name in ("execution_success", "execution_error", "execution_interrupted"):
            job["execution_end_time"] = data.get("timestamp")
            if name == "execution_error":
                job["execution_error"] = data
    outputs = item.result or {}
    preview = None
    for node_id, ui in outputs.items():
        for media, entries in (ui or {}).items():
            if not isinstance(entries, list):
                continue
            for entry in entries:
                if not isinstance(entry, dict):
                    continue
                job["outputs_count"] += 1
                if media == "images" and (preview is None or (entry.get("type") == "output"
                                                              and preview.get("type") != "output")):
                    preview = {**entry, "nodeId": node_id, "mediaType": media}
    if preview is not None:
        job["preview_output"] = preview
    if detail is not None:
        job["outputs"] = outputs
        job["execution_status"] = _history_entry(detail)["status"] if detail.messages else None
        job["workflow"] = {"prompt": detail.prompt, "extra_data": detail.extra_data}
    return job


async def _json_off_loop(build) -> web.Response:
    """``build()``'s answer as JSON, built and serialised in a thread: stored prompts can be megabytes,
    and parsing or writing them on the event loop would stall every other client."""
    body = await asyncio.to_thread(lambda: json.dumps(build()).encode())
    return web.Response(body=body, content_type="application/json")


class Api:
    """The route handlers over one server's runtime, store, worker, hub and user data."""

    def __init__(self, state):
        self.state = state
        self.rt = state.runtime

    def add_routes(self, app: web.Application) -> None:
        api = [
            ("GET", "/ws", self.state.hub.handle),
            ("GET", "/users", self.users), ("POST", "/users", self.create_user),
            ("GET", "/settings", self.settings), ("POST", "/settings", self.store_settings),
            ("GET", "/settings/{id}", self.setting), ("POST", "/settings/{id}", self.store_setting),
            ("GET", "/userdata", self.list_userdata),
            ("GET", "/userdata/{file}", self.get_userdata), ("POST", "/userdata/{file}", self.post_userdata),
            ("DELETE", "/userdata/{file}", self.delete_userdata),
            ("POST", "/userdata/{file}/move/{dest}", self.move_userdata),
            ("GET", "/extensions", self.extensions), ("GET", "/embeddings", self.empty_list),
            ("GET", "/i18n", self.empty_dict), ("GET", "/workflow_templates", self.workflow_templates),
            ("GET", "/workflow_templates/" + TEMPLATE_MODULE + "/{name}", self.workflow_template),
            ("GET", "/global_subgraphs", self.empty_dict),
            ("GET", "/experiment/models", self.empty_list), ("GET", "/experiment/models/{folder}", self.empty_list),
            ("GET", "/models", self.model_folders), ("GET", "/models/{folder}", self.model_files),
            ("GET", "/features", self.features),
            ("GET", "/object_info", self.object_info), ("GET", "/object_info/{node_class}", self.object_info_node),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/prompt", self.queue_status), ("POST", "/prompt", self.post_prompt),
            ("GET", "/queue", self.get_queue), ("POST", "/queue", self.post_queue),
            ("GET", "/history", self.get_history), ("POST", "/history", self.post_history),
            ("GET", "/history/{prompt_id}", self.get_history_item),
            ("GET", "/jobs", self.get_jobs), ("POST", "/jobs/cancel", self.cancel_jobs),
            ("GET", "/jobs/{prompt_id}", self.get_job), ("POST", "/jobs/{prompt_id}/cancel", self.cancel_job),
            ("POST", "/interrupt", self.interrupt), ("POST", "/free", self.free),
            ("GET", "/view", self.view),
            ("POST", "/loraloom/sweep", self.post_sweep),
        ]
        for method, path, handler in api:
            app.router.add_route(method, "/api" + path, handler)
            app.router.add_route(method, path, handler)
        app.router.add_get("/", self.index)
        app.router.add_get("/user.css", self.user_css)
        app.router.add_get("/templates/{name}", self.templates)
        if WEB_DIR.is_dir():
            app.router.add_static(EXTENSIONS_URL, WEB_DIR, follow_symlinks=False)
        if self.state.frontend_dir is not None:
            app.router.add_static("/", self.state.frontend_dir, follow_symlinks=False)

    # the page

    async def index(self, request):
        if self.state.frontend_dir is None:
            missing = LoomError("The visual editor is not installed.", kind="missing_extra",
                                fix="pip install 'loraloom[editor]' (the API works without it).")
            return web.Response(status=503, text=str(missing))
        response = web.FileResponse(self.state.frontend_dir / "index.html")
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def user_css(self, request):
        return web.Response(body=b"", content_type="text/css")

    async def templates(self, request):
        """The template indexes the page asks for at start: none ship with this server."""
        name = request.match_info["name"]
        if name == "index_logo.json":
            return web.json_response({})
        if _TEMPLATE_INDEX_RE.match(name):
            return web.json_response([])
        return _error(404, "not_found", f"no template {name!r}")

    async def workflow_templates(self, request):
        """The shipped editor workflows, as ComfyUI lists a node pack's example workflows (every
        ``.json`` at the top of its ``workflows/`` folder) for its template browser."""
        names = sorted(p.stem for p in SHIPPED_WORKFLOWS.glob("*.json") if p.is_file())
        return web.json_response({TEMPLATE_MODULE: names} if names else {})

    async def workflow_template(self, request):
        """One shipped workflow or its thumbnail (``<name>.json`` / ``<name>.jpg``), as ComfyUI serves
        a pack's example workflows folder; nothing else of that folder."""
        name = request.match_info["name"]
        path = SHIPPED_WORKFLOWS / name
        if not _TEMPLATE_FILE_RE.fullmatch(name) or not path.is_file():
            return _error(404, "not_found", f"no workflow template {name!r}")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def extensions(self, request):
        """The pack's editor extensions, as ComfyUI lists a node pack's ``WEB_DIRECTORY`` (the page
        imports each; its core extensions are built in, and it skips any listed)."""
        files = sorted(p.relative_to(WEB_DIR).as_posix() for p in WEB_DIR.rglob("*.js") if p.is_file())
        return web.json_response([f"{EXTENSIONS_URL}/{name}" for name in files])

    async def empty_list(self, request):
        return web.json_response([])

    async def empty_dict(self, request):
        return web.json_response({})

    async def features(self, request):
        return web.json_response(self.state.features)

    async def users(self, request):
        return web.json_response({"storage": "server", "migrated": True})  # single-user mode

    async def create_user(self, request):
        return _error(400, "single_user", "this server has a single user; there are no accounts to create")

    # settings and user files

    def _settings(self) -> dict:
        return {**DEFAULT_SETTINGS, **self.state.userdata.settings()}

    async def settings(self, request):
        return web.json_response(self._settings())

    async def setting(self, request):
        return web.json_response(self._settings().get(request.match_info["id"]))

    async def store_settings(self, request):
        values = await _read_json(request)
        if not isinstance(values, dict):
            return _error(400, "invalid_settings", "POST /settings takes an object of setting id -> value")
        self.state.userdata.update_settings(values)
        return web.json_response({})

    async def store_setting(self, request):
        value = await _read_json(request)
        self.state.userdata.update_settings({request.match_info["id"]: value})
        return web.json_response({})

    @_file_errors
    async def list_userdata(self, request):
        folder = request.query.get("dir", "")
        listing = self.state.userdata.listing(folder, recurse=_flag(request, "recurse"),
                                              full_info=_flag(request, "full_info"), split=_flag(request, "split"))
        if listing is None:
            return _error(404, "not_found", f"user folder {folder!r} does not exist")
        return web.json_response(listing)

    @_file_errors
    async def get_userdata(self, request):
        name = request.match_info["file"]
        found = self.state.userdata.read(name)
        if found is None:
            return _error(404, "not_found", f"user file {name!r} does not exist")
        return web.Response(body=found[0], content_type=found[1])

    @_file_errors
    async def post_userdata(self, request):
        data = await request.read()
        path = self.state.userdata.write(request.match_info["file"], data,
                                         overwrite=_flag(request, "overwrite", True))
        info = self.state.userdata.info(path)
        return web.json_response(info if _flag(request, "full_info") else info["path"])

    @_file_errors
    async def delete_userdata(self, request):
        name = request.match_info["file"]
        if not self.state.userdata.delete(name):
            return _error(404, "not_found", f"user file {name!r} does not exist")
        return web.Response(status=204)

    @_file_errors
    async def move_userdata(self, request):
        source, dest = request.match_info["file"], request.match_info["dest"]
        path = self.state.userdata.move(source, dest, overwrite=_flag(request, "overwrite"))
        if path is None:
            return _error(404, "not_found", f"user file {source!r} does not exist")
        info = self.state.userdata.info(path)
        return web.json_response(info if _flag(request, "full_info") else info["path"])

    # nodes and models

    async def object_info(self, request):
        return web.json_response(await asyncio.to_thread(self.rt.object_info))

    async def object_info_node(self, request):
        name = request.match_info["node_class"]
        info = await asyncio.to_thread(self.rt.object_info)
        if name not in info:
            return _error(404, "unknown_node", f"no node {name!r}")
        return web.json_response({name: info[name]})

    async def model_folders(self, request):
        return web.json_response(["loras"])

    async def model_files(self, request):
        if request.match_info["folder"] != "loras":
            return _error(404, "unknown_folder", f"no model folder {request.match_info['folder']!r}; "
                                                 "this server lists 'loras'")
        names = await asyncio.to_thread(self.rt.folders.list, "loras", (".safetensors",))
        return web.json_response(names)

    async def system_stats(self, request):
        return web.json_response(_system_stats(self.state.argv))

    # queue, history, jobs

    async def queue_status(self, request):
        return web.json_response({"exec_info": {"queue_remaining": self.state.store.remaining()}})

    async def _checked(self, request, check):
        """A ``POST /prompt``-shaped body read, its workflow loaded and ``check(workflow, body)`` run in a
        thread (validating lists folders): ``(body, pnginfo, workflow, checked)``, or the 400 response
        saying what is wrong."""
        body = await _read_json(request, locate=functools.partial(locate_in_workflow, registry=self.rt.registry))
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), dict):
            return _error(400, "no_prompt", "No prompt provided",
                          "the body must be an object with 'prompt': an API-format workflow", node_errors={})
        problems = _prompt_body_problems(body)
        if problems:
            return _error(400, "invalid_prompt", "Invalid prompt", "; ".join(problems), node_errors={})
        extra = body.get("extra_data", {})
        pnginfo = extra.get("extra_pnginfo") if isinstance(extra.get("extra_pnginfo"), dict) else None

        def load_and_check():
            extra_data = {"extra_pnginfo": pnginfo} if pnginfo else {}
            workflow = self.rt.load({"prompt": body["prompt"], "extra_data": extra_data})
            return workflow, check(workflow, body)

        try:
            workflow, checked = await asyncio.to_thread(load_and_check)
        except ValidationError as exc:
            return web.json_response(exc.to_json(), status=400)
        except LoomError as exc:
            return _error(400, "invalid_prompt", "Invalid prompt", str(exc), node_errors={}, cause=exc)
        return body, pnginfo, workflow, checked

    def _enqueue(self, body: dict, pnginfo: dict | None, workflow, outputs: list, **extra):
        """Queue a checked prompt; the ``(prompt_id, number)``, or the 400 response for a duplicate id.
        ``extra`` joins the stored extra_data."""
        # Only what a run needs is kept: other extra_data (e.g. cloud API keys) never reaches the disk.
        extra_data = {"client_id": body.get("client_id"), "create_time": int(time.time() * 1000), **extra}
        if pnginfo:
            extra_data["extra_pnginfo"] = pnginfo
        prompt_id = body.get("prompt_id") or str(uuid.uuid4())
        try:
            number = self.state.store.add(prompt_id, workflow.prompt, extra_data, outputs,
                                          front=bool(body.get("front")))
        except DuplicateId as exc:
            return _error(400, "duplicate_prompt_id", "Invalid prompt", str(exc), node_errors={}, cause=exc)
        self.state.worker.notify()
        self.state.hub.publish_status()
        return prompt_id, number

    async def post_prompt(self, request):
        checked = await self._checked(request, lambda workflow, body: self.rt.validate(workflow))
        if isinstance(checked, web.Response):
            return checked
        body, pnginfo, workflow, valid = checked
        outputs = valid.outputs
        if body.get("partial_execution_targets"):
            outputs = [str(t) for t in body["partial_execution_targets"]]
            unknown = [t for t in outputs if t not in valid.nodes]
            if unknown:
                return _error(400, "invalid_prompt", "Invalid prompt",
                              f"partial_execution_targets {unknown} are not nodes of the prompt", node_errors={})
        queued = self._enqueue(body, pnginfo, workflow, outputs)
        if isinstance(queued, web.Response):
            return queued
        prompt_id, number = queued
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def post_sweep(self, request):
        """Queue a sweep like a prompt: ``{"prompt": API workflow, "axes": [...] or {...}, "zip": [...],
        "seeds": [...], "client_id", "prompt_id", "extra_data"}`` (axes as `Runtime.sweep` takes them).
        Every cell is validated now: a failing one answers 400 with every cell's problems (``node_errors``
        and ``error.extra_info.cells``). The worker runs it in queue order; each finished cell is a
        ``sweep_cell`` message on the websocket; the history's outputs list the grid(s), the cells'
        images and the manifest under ``"sweep"``. The folder is always under the output folder."""
        from ..sweep.spec import plan

        def planned(workflow, body):
            return plan(self.rt, workflow, axes=body.get("axes") or (), zip=body.get("zip") or (),
                        seeds=body.get("seeds"))

        checked = await self._checked(request, planned)
        if isinstance(checked, web.Response):
            return checked
        body, pnginfo, workflow, sweep = checked
        queued = self._enqueue(body, pnginfo, workflow, [], **{SWEEP_KEY: sweep.spec.to_json()})
        if isinstance(queued, web.Response):
            return queued
        prompt_id, number = queued
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {},
                                  "cells": len(sweep.cells), "shape": list(sweep.spec.shape)})

    async def get_queue(self, request):
        def build():
            running, pending = self.state.store.queue()
            return {"queue_running": [i.as_tuple() for i in running], "queue_pending": [i.as_tuple() for i in pending]}

        return await _json_off_loop(build)

    async def post_queue(self, request):
        body = await _read_json(request, empty={})
        if not isinstance(body, dict):
            return _error(400, "invalid_request", "POST /queue takes {'clear': true} or {'delete': [ids]}")
        result = {"deleted": [], "interrupted": []}
        if body.get("clear"):
            result["deleted"] += self.state.store.delete_pending()
        for prompt_id in _ids(body.get("delete", []), "delete"):
            outcome = self.state.worker.cancel(prompt_id)
            if outcome == INTERRUPTING:
                result["interrupted"].append(prompt_id)
            elif outcome == DELETED:
                result["deleted"].append(prompt_id)
        self.state.hub.publish_status()
        return web.json_response(result)

    async def get_history(self, request):
        max_items = _int_query(request, "max_items", None, 0)
        offset = _int_query(request, "offset", 0, 0)
        return await _json_off_loop(lambda: {i.prompt_id: _history_entry(i)
                                             for i in self.state.store.history(max_items, offset)})

    async def get_history_item(self, request):
        prompt_id = request.match_info["prompt_id"]
        item = await asyncio.to_thread(self.state.store.get, prompt_id)
        if item is None:
            return _error(404, "unknown_prompt", f"no prompt {prompt_id!r} (never queued, cancelled or deleted)")
        if item.status in (PENDING, RUNNING):
            return web.json_response({})  # ComfyUI's answer until it is done: clients poll
        return web.json_response({prompt_id: _history_entry(item)})

    async def post_history(self, request):
        body = await _read_json(request, empty={})
        if not isinstance(body, dict):
            return _error(400, "invalid_request", "POST /history takes {'clear': true} or {'delete': [ids]}")
        deleted = []
        if body.get("clear"):
            deleted += self.state.store.delete_history()
        if "delete" in body:
            deleted += self.state.store.delete_history(_ids(body["delete"], "delete"))
        return web.json_response({"deleted": deleted})

    async def get_jobs(self, request):
        wanted = {s for s in request.query.get("status", "").split(",") if s} or set(JOB_STATUS.values())
        limit = _int_query(request, "limit", MAX_JOBS_PAGE, 1, MAX_JOBS_PAGE)
        offset = _int_query(request, "offset", 0, 0)
        statuses = [s for s, job_status in JOB_STATUS.items() if job_status in wanted]
        newest_first = request.query.get("sort_order", "desc") != "asc"

        def build():
            rows, total = self.state.store.jobs(statuses, request.query.get("workflow_id") or None, newest_first,
                                                limit, offset)
            return {"jobs": [_job(r) for r in rows], "pagination": {"offset": offset, "limit": limit, "total": total,
                                                                    "has_more": offset + len(rows) < total}}

        return await _json_off_loop(build)

    async def get_job(self, request):
        item = await asyncio.to_thread(self.state.store.get, request.match_info["prompt_id"])
        if item is None:
            return _error(404, "unknown_prompt", f"no job {request.match_info['prompt_id']!r}")
        return await _json_off_loop(lambda: _job(_job_row(item), detail=item))

    async def cancel_job(self, request):
        prompt_id = request.match_info["prompt_id"]
        outcome = self.state.worker.cancel(prompt_id)
        if outcome == UNKNOWN:
            return _error(404, "unknown_prompt", f"no job {prompt_id!r}")
        return web.json_response({"id": prompt_id, "result": outcome})

    async def cancel_jobs(self, request):
        body = await _read_json(request, empty={})
        ids = _ids(body.get("job_ids") if isinstance(body, dict) else None, "job_ids")
        return web.json_response({i: self.state.worker.cancel(i) for i in ids})

    async def interrupt(self, request):
        body = await _read_json(request, empty={})
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        if prompt_id is not None and not isinstance(prompt_id, str):
            return _error(400, "invalid_request", "'prompt_id' must be a string")
        return web.json_response({"interrupted": self.state.worker.interrupt(prompt_id)})

    async def free(self, request):
        body = await _read_json(request, empty={})
        if not isinstance(body, dict):
            return _error(400, "invalid_request", "POST /free takes {'unload_models': bool, 'free_memory': bool}")
        self.state.worker.request_free(bool(body.get("unload_models")), bool(body.get("free_memory")))
        return web.json_response({})

    # files

    @_file_errors
    async def view(self, request):
        filename = request.query.get("filename")
        if not filename:
            return _error(400, "bad_request", "/view needs ?filename=")
        kind = request.query.get("type", "output")
        output = self.rt.folders.output_dir
        roots = {"output": output, "temp": output / TEMP_SUBFOLDER}
        if kind not in roots:
            return _error(400, "bad_request", f"type {kind!r}: this server serves 'output' and 'temp' files")
        subfolder = request.query.get("subfolder", "")
        name = f"{subfolder.rstrip('/')}/{filename}" if subfolder else filename
        if any(part.startswith(".") and part not in (".", "..") for part in name.split("/")):
            # hidden names are never outputs: a save's temp file (.<name>.<host>-<pid>.<n>.tmp) is not
            # one yet, or was left by a killed save
            return _error(404, "not_found", f"no {kind} file {name!r}: hidden names are not served")
        try:
            path = resolve_under(roots[kind], name, what="output file", must_exist=False)
        except PathError as exc:
            if exc.kind != "outside_root":
                raise
            # The message would name where the link points and the output folder's place on disk.
            return _error(400, "bad_path", f"{kind} file {name!r} leads outside the {kind} folder "
                                               "(a symlink?); refusing to serve it")
        if not path.is_file():
            return _error(404, "not_found", f"no {kind} file {name!r}")
        content_type = INLINE_IMAGES.get(path.suffix.lower())
        disposition = "inline" if content_type else "attachment"
        response = web.FileResponse(path, headers={
            "Content-Type": content_type or "application/octet-stream",
            "Content-Disposition": f'{disposition}; filename="{_header_safe(path.name)}"',
            "Cache-Control": "no-cache"})
        return response


def _header_safe(name: str) -> str:
    return "".join(c if c.isprintable() and c not in '"\\' else "_" for c in name)


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return 0, 0


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _system_stats(argv: list[str]) -> dict:
    ram_total, ram_free = _memory()
    devices = [{"name": f"cpu ({platform.processor() or platform.machine()})", "type": "cpu", "index": None,
                "vram_total": ram_total, "vram_free": ram_free, "torch_vram_total": 0, "torch_vram_free": 0}]
    torch = sys.modules.get("torch")  # reported if the runtime loaded it; never imported just for this
    if torch is not None and torch.cuda.is_available():
        devices = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append({"name": torch.cuda.get_device_name(index), "type": "cuda", "index": index,
                            "vram_total": total, "vram_free": free, "torch_vram_total": total,
                            "torch_vram_free": free})
    return {"system": {"os": os.name, "ram_total": ram_total, "ram_free": ram_free,
                       "comfyui_version": f"loraloom {_version('loraloom')}", "python_version": sys.version,
                       "pytorch_version": _version("torch"), "embedded_python": False, "argv": argv},
            "devices": devices}

