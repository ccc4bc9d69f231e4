"""The editor in a real browser: ComfyUI's frontend (the comfyui-frontend-package wheel) served by
``loraloom serve``'s app over the real nodes, driven in Debian's ``chromium`` by playwright.

It starts with no error of ours in its console and no request beyond this server; each shipped
UI-format workflow loads through the page with no missing node type, and what the page would queue
validates and means what our API file means; blend and merge_dare are queued and their images appear
on the Save Image node. fuse_compile (about a minute of torch.compile on a CPU) is loaded and
validated, not run. With a token, the page works through the cookie that ``/?token=`` sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from loraloom.server import STATE, ServerConfig, create_app

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
SHIPPED = ["blend", "merge_dare", "fuse_compile"]
RUN = {"blend": "blend_", "merge_dare": "merge_dare_"}  # workflow -> its SaveImage filename prefix
CHROMIUM_PATHS = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]  # Debian's chromium package


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (.ci/run installs it)")
    pytest.skip(reason)


def _chromium() -> str:
    for path in [os.environ.get("LORALOOM_CHROMIUM")] + CHROMIUM_PATHS + [shutil.which("chromium")]:
        if path and os.access(path, os.X_OK):
            return path
    _missing("Debian's chromium is not installed (apt-get install chromium)")


class LiveServer:
    """The app on 127.0.0.1 (a free port), its event loop in a background thread."""

    def __init__(self, app):
        from aiohttp import web

        self.app = app
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = self.runner.addresses[0][1]
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="live-server", daemon=True)
        self.thread.start()
        assert started.wait(30), "the server did not start"
        self.url = f"http://127.0.0.1:{self.port}/"

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


class Editor:
    """The page, and every problem it reported: console errors, page errors, failed requests."""

    def __init__(self, page, server: LiveServer, runtime):
        self.page = page
        self.server = server
        self.runtime = runtime
        self.problems: list[str] = []
        self.foreign: list[str] = []
        origin = server.url.rstrip("/")

        def ours(url: str) -> bool:
            return not url or url.startswith(origin)

        def on_console(msg):
            if msg.type == "error":
                self.problems.append(f"console: {msg.text} ({msg.location.get('url')})")

        def on_request(request):
            if not ours(request.url) and not request.url.startswith(("data:", "blob:")):
                self.foreign.append(request.url)

        def on_response(response):
            if ours(response.url) and response.status >= 400:
                self.problems.append(f"HTTP {response.status}: {response.request.method} {response.url}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("request", on_request)
        page.on("response", on_response)
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}")
                if ours(r.url) else None)

    def load(self, name: str) -> None:
        workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
        self.page.evaluate("async wf => { await window.app.loadGraphData(wf) }", workflow)

    def missing_node_types(self) -> list[str]:
        return self.page.evaluate(
            "window.app.graph.nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type)")

    def page_prompt(self) -> dict:
        """What the page would queue for the loaded graph (its own UI -> API conversion)."""
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, through playwright (one for the module)."""
    pytest.importorskip("comfyui_frontend_package", reason="pip install 'loraloom[editor]'")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    chromium = _chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


@contextlib.contextmanager
def open_editor(browser, root: Path, token: str | None = None):
    """Serve the real nodes from ``root`` and open the page in a fresh browser context: an :class:`Editor`."""
    from loraloom import Runtime

    runtime = Runtime(lora_dirs=[root / "loras"], models_dir=root / "models", output_dir=root / "output",
                      demo_loras=True)  # the shipped workflows are loaded and run
    server = LiveServer(create_app(runtime, ServerConfig(user_dir=root / "user", token=token)))
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        ed = Editor(page, server, runtime)
        page.goto(server.url + (f"?token={token}" if token else ""))
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph")
        page.wait_for_load_state("networkidle")
        yield ed
    finally:
        context.close()
        server.stop()


@pytest.fixture(scope="module")
def editor(browser, tmp_path_factory):
    with open_editor(browser, tmp_path_factory.mktemp("editor")) as ed:
        yield ed


def test_the_editor_starts_with_no_error_of_ours(editor):
    assert editor.page.title(), "the page has loaded"
    registered = editor.page.evaluate("Object.keys(window.LiteGraph.registered_node_types)")
    assert {"LoadBase", "LoadLoRA", "WeightedBlend", "PeftMerge", "Fuse", "Compile", "Sample", "SaveImage"} \
        <= set(registered), "our nodes come from /object_info"
    assert editor.problems == [], "the page reported errors:\n" + "\n".join(editor.problems)
    assert editor.foreign == [], f"the page asked beyond this server: {editor.foreign}"


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_workflow_loads_with_every_node_type(editor, name):
    editor.load(name)
    assert editor.missing_node_types() == [], f"{name}: node types the editor does not know"
    page = editor.runtime.validate({"prompt": editor.page_prompt()})
    shipped = editor.runtime.validate(WORKFLOWS / f"{name}_api.json")
    assert page.nodes == shipped.nodes, f"{name}: what the editor queues must mean what the API file means"
    assert editor.problems == [], "\n".join(editor.problems)


@pytest.mark.parametrize("name", sorted(RUN))
def test_a_queued_workflow_shows_its_image(editor, name):
    editor.load(name)
    # The canvas loads a node's images when it draws the node: bring the Save Image node into view.
    editor.page.evaluate("window.app.canvas.centerOnNode(window.app.graph.nodes.find(n => n.type === 'SaveImage'))")
    assert editor.page.evaluate("window.app.queuePrompt(0, 1)") is not False, "the page queued the prompt"
    prefix = RUN[name]
    editor.page.wait_for_function(
        """prefix => window.app.graph.nodes.some(n => n.type === 'SaveImage' && (n.imgs || []).some(
               img => img.complete && img.naturalWidth === 128 && img.src.includes('filename=' + prefix)))""",
        arg=prefix, timeout=180_000)
    store = editor.server.app[STATE].store
    for _ in range(500):
        if store.remaining() == 0:
            break
        time.sleep(0.01)
    last = store.history()[-1]
    assert last.status == "success", f"{name}: {last.messages}"
    saved = sorted((editor.runtime.folders.output_dir).glob(f"{prefix}*.png"))
    assert saved, f"{name}: no {prefix}*.png in the output folder"
    assert editor.problems == [], "\n".join(editor.problems)


def test_with_a_token_the_page_works_through_its_cookie(browser, tmp_path):
    with open_editor(browser, tmp_path, token="t0k3n") as ed:
        assert ed.page.url.endswith("/") and "t0k3n" not in ed.page.url, "the token leaves the address bar"
        assert ed.page.evaluate("window.app.api.socket.readyState") == 1, "the websocket got in with the cookie"
        assert ed.problems == [], "\n".join(ed.problems)
        status = ed.page.evaluate("fetch('/api/queue', {credentials: 'omit'}).then(r => r.status)")
        assert status == 401, "without the cookie the server refuses"
        ed.problems.clear()
