"""The editor in a real browser: ComfyUI's frontend (the comfyui-frontend-package wheel) served by
``loraloom serve``'s app over the real nodes, driven in Debian's ``chromium`` by playwright.

It starts with no error of ours in its console and no request beyond this server; each shipped
UI-format workflow loads through the page with no missing node type, and what the page would queue
validates and means what our API file means; blend, merge_dare, flux_blend and flux_merge are queued and
their images appear on the Save Image node. fuse_compile (about two minutes of torch.compile on a CPU)
is loaded and validated, not run; after a run each node shows the text it reported (our editor extension). Every
shipped workflow, and every node placed fresh from the node library, round-trips other values in
every widget: saved, queued, and read back by our converter. With a token, the page works through
the cookie that ``/?token=`` sets.
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
SHIPPED = sorted(p.stem for p in WORKFLOWS.glob("*.json") if not p.stem.endswith("_api"))  # every UI workflow
RUN = {"blend": "blend_", "merge_dare": "merge_dare_", "flux_blend": "flux_blend_",
       "flux_merge": "flux_merge_"}  # workflow -> its SaveImage prefix
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

    def load(self, name: str, folder: Path = WORKFLOWS) -> None:
        workflow = json.loads((folder / f"{name}.json").read_text())
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

    skeleton = root / "models" / "skeleton"  # a diffusers folder: LoadBase's source and config get a second option
    skeleton.mkdir(parents=True, exist_ok=True)
    (skeleton / "model_index.json").write_text("{}")
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
        page.evaluate("""() => { window.loomTexts = {};  // node id -> the ui text the server sent for it
            window.app.api.addEventListener('executed', ({detail}) => {
                if (detail.output?.text) window.loomTexts[detail.node] = detail.output.text }) }""")
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
    old = {"LoadBase", "LoadLoRA", "WeightedBlend", "PeftMerge", "Fuse", "Compile", "Sample"}
    assert {"LoraLoom" + i for i in old} | {"SaveImage"} <= set(registered), "our nodes come from /object_info"
    assert old <= set(registered), "the old ids too, so workflows saved with them open"
    assert editor.problems == [], "the page reported errors:\n" + "\n".join(editor.problems)
    assert editor.foreign == [], f"the page asked beyond this server: {editor.foreign}"


def test_a_new_user_sees_the_shipped_workflows_as_templates_and_one_opens(browser, tmp_path):
    # a fresh user folder: the page opens its template browser, which lists what /workflow_templates
    # offers (ComfyUI: every pack's example workflows), each with its thumbnail
    with open_editor(browser, tmp_path) as ed:
        ed.page.get_by_text(f"Showing {len(SHIPPED)} of {len(SHIPPED)} templates").wait_for()
        ed.page.wait_for_load_state("networkidle")
        cards = ed.page.evaluate("""() => Array.from(document.querySelectorAll('img'))
            .filter(i => i.complete && i.naturalWidth === 256).length""")
        assert cards == len(SHIPPED), f"{cards} thumbnails shown, {len(SHIPPED)} workflows shipped"
        ed.page.get_by_text("shapes_blend", exact=True).click()
        ed.page.wait_for_function("window.app.graph.nodes.some(n => n.type === 'LoraLoomSample')")
        page = ed.runtime.validate({"prompt": ed.page_prompt()})
        assert page.nodes == ed.runtime.validate(WORKFLOWS / "api" / "shapes_blend_api.json").nodes
        assert ed.problems == [], "\n".join(ed.problems)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_workflow_loads_with_every_node_type(editor, name):
    editor.load(name)
    assert editor.missing_node_types() == [], f"{name}: node types the editor does not know"
    page = editor.runtime.validate({"prompt": editor.page_prompt()})
    shipped = editor.runtime.validate(WORKFLOWS / "api" / f"{name}_api.json")
    assert page.nodes == shipped.nodes, f"{name}: what the editor queues must mean what the API file means"
    assert editor.problems == [], "\n".join(editor.problems)


def test_a_workflow_saved_with_the_old_ids_opens_and_its_nodes_are_deprecated(editor):
    old_ids = Path(__file__).resolve().parents[1] / "workflows" / "old_ids"
    editor.load("blend", old_ids)
    assert editor.missing_node_types() == [], "the old ids are node types the editor knows"
    prompt = editor.page_prompt()
    assert prompt["5"]["class_type"] == "Sample", "the editor keeps the id the file has"
    assert editor.runtime.validate({"prompt": prompt}).nodes == editor.runtime.validate(old_ids / "blend_api.json").nodes
    # the frontend's node search leaves out a node type whose definition says deprecated
    deprecated = editor.page.evaluate("""names => names.map(n => [n,
        window.LiteGraph.registered_node_types[n]?.nodeData?.deprecated === true])""",
                                      ["Sample", "LoadLoRA", "LoraLoomSample", "LoraLoomLoadLoRA"])
    assert deprecated == [["Sample", True], ["LoadLoRA", True], ["LoraLoomSample", False],
                          ["LoraLoomLoadLoRA", False]]
    assert editor.problems == [], "\n".join(editor.problems)


def _last_run(editor):
    """The history entry of the last prompt, once the queue is empty (the page may show an image first)."""
    store = editor.server.app[STATE].store
    for _ in range(500):
        if store.remaining() == 0:
            break
        time.sleep(0.01)
    return store.history()[-1]


@pytest.mark.parametrize("name", sorted(RUN))
def test_a_queued_workflow_shows_its_image(editor, name):
    editor.load(name)
    # The canvas loads a node's images when it draws the node: bring the Save Image node into view.
    editor.page.evaluate("window.app.canvas.centerOnNode(window.app.graph.nodes.find(n => n.type === 'SaveImage'))")
    editor.page.evaluate("window.loomTexts = {}")
    assert editor.page.evaluate("window.app.queuePrompt(0, 1)") is not False, "the page queued the prompt"
    prefix = RUN[name]
    editor.page.wait_for_function(
        """prefix => window.app.graph.nodes.some(n => n.type === 'SaveImage' && (n.imgs || []).some(
               img => img.complete && img.naturalWidth === 128 && img.src.includes('filename=' + prefix)))""",
        arg=prefix, timeout=180_000)
    last = _last_run(editor)
    assert last.status == "success", f"{name}: {last.messages}"
    saved = sorted((editor.runtime.folders.output_dir).glob(f"{prefix}*.png"))
    assert saved, f"{name}: no {prefix}*.png in the output folder"
    shown = editor.page.evaluate("""() => Object.fromEntries(Object.keys(window.loomTexts).map(id => {
        const w = (window.app.graph.getNodeById(Number(id)).widgets || []).find(w => w.name === 'loraloom_text');
        return [id, w && w.element.isConnected ? w.element.value : null] }))""")
    texts = editor.page.evaluate("window.loomTexts")
    assert texts.get("4"), f"{name}: node 4 (the blend recipe, the merge report) reported no text: {texts}"
    assert shown == {node: "\n".join(lines) for node, lines in texts.items()}, "each node shows its ui text"
    after = editor.page.evaluate("async () => await window.app.graphToPrompt()")
    shipped = {n["id"]: n.get("widgets_values") for n in json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"]}
    assert {n["id"]: n.get("widgets_values") for n in after["workflow"]["nodes"]} == shipped, \
        "the text box is neither saved with the workflow nor shifts what is"
    assert not any("loraloom_text" in n["inputs"] for n in after["output"].values()), "nor is it queued"
    assert editor.problems == [], "\n".join(editor.problems)


def test_a_sweep_grid_runs_from_the_editor_and_shows_its_grid(editor):
    """The shipped sweep_grid, queued from the page: the SweepGrid node shows the grid and its summary."""
    editor.load("sweep_grid")
    editor.page.evaluate("window.app.canvas.centerOnNode(window.app.graph.getNodeById(6))")
    editor.page.evaluate("window.loomTexts = {}")
    assert editor.page.evaluate("window.app.queuePrompt(0, 1)") is not False, "the page queued the prompt"
    editor.page.wait_for_function(
        """() => (window.app.graph.getNodeById(6).imgs || []).some(
               img => img.complete && img.naturalWidth > 3 * 64 && img.src.includes('filename=grid.png'))""",
        timeout=300_000)
    last = _last_run(editor)
    assert last.status == "success", last.messages
    texts = editor.page.evaluate("window.loomTexts")
    assert texts.get("6", [""])[0].startswith("3 x 2 grid: 6 of 6 cells"), texts
    assert editor.problems == [], "\n".join(editor.problems)


def test_with_a_token_the_page_works_through_its_cookie(browser, tmp_path):
    with open_editor(browser, tmp_path, token="t0k3n") as ed:
        assert ed.page.url.endswith("/") and "t0k3n" not in ed.page.url, "the token leaves the address bar"
        assert ed.page.evaluate("window.app.api.socket.readyState") == 1, "the websocket got in with the cookie"
        assert ed.problems == [], "\n".join(ed.problems)
        status = ed.page.evaluate("fetch('/api/queue', {credentials: 'omit'}).then(r => r.status)")
        assert status == 401, "without the cookie the server refuses"
        ed.problems.clear()


# The round trip: every widget of every node gets a value other than the one it has, the page saves
# (exports) the workflow and queues it; the prompt it posts and our reading of its saved workflow must
# both carry exactly the values set. The queue request is answered here, not run (the values are other,
# not meaningful: a preset with a config folder is refused by validation, which is tested elsewhere).

EDITOR_WIDGETS_JS = """() => Object.fromEntries(window.app.graph.nodes.map(n => [n.id, {
    type: n.type,
    widgets: (n.widgets || []).filter(w => w.serialize !== false).map(w => ({
        name: w.name, value: w.value, values: Array.isArray(w.options?.values) ? w.options.values : null}))}]))"""
STRINGS = {"block_weights": "0.5", "adapter_names": "", "prompt": "a red square, round trip",
           "negative_prompt": "blurry"}  # values that also pass validation; other strings get a suffix
CONTROL = "control_after_generate"


def _other_value(inp, current, combo_values):
    """A value for widget ``inp`` other than ``current``, inside its range and options."""
    if inp.type in ("INT", "FLOAT"):
        step = inp.step or 1
        value = current + step if inp.max is None or current + step <= inp.max else current - step
        return round(value, 6) if inp.type == "FLOAT" else value
    if inp.type == "BOOLEAN":
        return not current
    if inp.type == "STRING":
        value = STRINGS.get(inp.name, f"{current}-rt")
        return value if value != current else f"{current}-rt"
    return next(v for v in combo_values if v != current)


class RoundTrip:
    """Set other values in every widget of the page's graph, save, queue, and hold what the page sent."""

    def __init__(self, editor):
        self.editor = editor
        self.posted: list[dict] = []

    def set_other_values(self) -> dict:
        """{node id: {widget: value}} set in the page, control widgets included."""
        registry = self.editor.runtime.registry
        chosen = {}
        for node_id, node in self.editor.page.evaluate(EDITOR_WIDGETS_JS).items():
            schema = registry.get(node["type"]).SCHEMA
            values = {}
            for w in node["widgets"]:
                if w["name"] == CONTROL:
                    values[CONTROL] = "fixed" if w["value"] != "fixed" else "increment"
                else:
                    values[w["name"]] = _other_value(schema.input(w["name"]), w["value"], w["values"])
            chosen[node_id] = values
        self.editor.page.evaluate("""chosen => { for (const n of window.app.graph.nodes)
            for (const [name, value] of Object.entries(chosen[n.id] || {}))
                n.widgets.find(w => w.name === name).value = value }""", chosen)
        return chosen

    def save_and_queue(self) -> tuple[dict, dict]:
        """The workflow the page exports, and the body of the POST /prompt it sends when queued."""
        page = self.editor.page

        def answer(route):
            if route.request.method != "POST":
                return route.continue_()
            self.posted.append(json.loads(route.request.post_data))
            return route.fulfill(json={"prompt_id": f"rt-{len(self.posted)}", "number": 0, "node_errors": {}})

        workflow = page.evaluate("async () => (await window.app.graphToPrompt()).workflow")
        page.route("**/prompt", answer)
        try:
            assert page.evaluate("window.app.queuePrompt(0, 1)") is not False, "the page queued the prompt"
        finally:
            page.unroute("**/prompt", answer)
        assert len(self.posted) == 1, "one POST /prompt"
        return workflow, self.posted[0]


def _assert_values(where: str, prompt: dict, chosen: dict) -> None:
    for node_id, values in chosen.items():
        inputs = prompt[str(node_id)]["inputs"]
        for name, value in values.items():
            if name == CONTROL:
                assert name not in inputs, f"{where}: node {node_id}: the control widget is the page's own"
                continue
            assert inputs.get(name) == (pytest.approx(value) if isinstance(value, float) else value), \
                f"{where}: node {node_id} ({prompt[str(node_id)]['class_type']}) input {name!r}: {inputs.get(name)!r}"


def _round_trip(editor) -> tuple[dict, dict]:
    """Set other values in the page's graph, save and queue: the values set and the saved workflow."""
    from loraloom.graph_runtime.workflow import ui_to_api

    trip = RoundTrip(editor)
    chosen = trip.set_other_values()
    workflow, body = trip.save_and_queue()
    _assert_values("the prompt the page posted", body["prompt"], chosen)
    embedded = body["extra_data"]["extra_pnginfo"]["workflow"]  # what a saved image carries
    assert [n.get("widgets_values") for n in embedded["nodes"]] == [n.get("widgets_values") for n in workflow["nodes"]]
    _assert_values("our reading of the saved workflow", ui_to_api(workflow, editor.runtime.registry), chosen)
    for node in workflow["nodes"]:
        if CONTROL in chosen[str(node["id"])]:
            assert chosen[str(node["id"])][CONTROL] in node["widgets_values"], "the control value is saved"
    return chosen, workflow


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_workflow_round_trips_other_values_through_the_editor(editor, name):
    from loraloom.graph_runtime.workflow import ui_to_api

    shipped = json.loads((WORKFLOWS / f"{name}.json").read_text())
    editor.load(name)
    page_nodes = editor.page.evaluate(EDITOR_WIDGETS_JS)
    ours = ui_to_api(shipped, editor.runtime.registry)
    for node in shipped["nodes"]:
        widgets = page_nodes[str(node["id"])]["widgets"]
        assert len(node.get("widgets_values", [])) == len(widgets), \
            f"{name}: node {node['id']} ({node['type']}): the editor has {[w['name'] for w in widgets]}"
        for w in widgets:
            if w["name"] != CONTROL:
                assert ours[str(node["id"])]["inputs"][w["name"]] == w["value"], (name, node["id"], w["name"])
    _round_trip(editor)
    assert editor.problems == [], "\n".join(editor.problems)


def test_every_node_placed_fresh_round_trips_other_values_through_the_editor(editor):
    types = sorted(editor.page.evaluate(
        "Object.keys(window.LiteGraph.registered_node_types).filter(t => window.LiteGraph.registered_node_types[t]"
        ".nodeData?.python_module?.startsWith('custom_nodes.loraloom'))"))
    assert set(editor.runtime.registry) <= set(types), "every node of ours is in the node library"
    editor.page.evaluate("""types => { window.app.graph.clear();
        types.forEach((type, i) => { const n = window.LiteGraph.createNode(type);
            n.pos = [50 + 400 * (i % 5), 50 + 500 * Math.floor(i / 5)]; window.app.graph.add(n) }) }""", types)
    fresh = editor.page.evaluate(EDITOR_WIDGETS_JS)
    for node in fresh.values():
        schema = editor.runtime.registry.get(node["type"]).SCHEMA
        names = [w["name"] for w in node["widgets"]]
        assert [n for n in names if n != CONTROL] == [w.name for w in schema.widgets], node["type"]
        for w in node["widgets"]:
            inp = schema.input(w["name"])
            if inp is not None and inp.has_default:
                assert w["value"] == inp.default, f"{node['type']}.{w['name']}: the editor's default"
        controlled = [names[i - 1] for i, name in enumerate(names) if name == CONTROL]
        assert controlled == [w.name for w in schema.widgets if w.control_after_generate], node["type"]
        for name in controlled:
            start = schema.input(name).control_after_generate
            assert node["widgets"][names.index(name) + 1]["value"] == (start if isinstance(start, str) else
                                                                      "randomize"), \
                f"{node['type']}.{name}: its control starts as declared (PeftMerge's seed: fixed, reproducible)"
    chosen, saved = _round_trip(editor)  # saved before the queue: after it, "increment" has moved a seed on
    editor.page.evaluate("async wf => { await window.app.loadGraphData(wf) }", saved)
    reloaded = editor.page.evaluate(EDITOR_WIDGETS_JS)
    assert {i: {w["name"]: w["value"] for w in n["widgets"]} for i, n in reloaded.items()} == chosen, \
        "a saved workflow loads with the values it was saved with, control modes included"
    assert editor.problems == [], "\n".join(editor.problems)


# Workflows made in the editor: each builder below works on the shipped blend workflow in the page
# through the editor's own graph API (convert to subgraph, add a subgraph input for a widget as its
# "promote widget" does, native reroutes, bypass, mute), exactly what a user's clicks call. The page
# saves the result (what its Save writes: a 0.4 root with 1.0 subgraph definitions, and the 1.0 schema
# its graph serialises to), loads each saved file again and queues it; the POST /prompt body it sends
# is the prompt our converter must produce. `python tests/server/test_browser.py [NAME ...]` re-makes the files.

EDITOR_MADE = Path(__file__).resolve().parents[1] / "workflows" / "editor"
# Our node ids with or without the "LoraLoom" prefix (the old ids stay loadable as aliases): the builders
# place the canonical one.
OURS_JS = """name => ("LoraLoom" + name) in window.LiteGraph.registered_node_types ? "LoraLoom" + name : name"""
PROMOTE_JS = """(host, inner, name) => {  // what the editor's 'Promote widget' does: a subgraph input on the widget
    const slot = inner.getSlotFromWidget(inner.widgets.find(w => w.name === name));
    host.subgraph.addInput(name, String(slot.type)).connect(slot, inner);
    return host.widgets.find(w => w.name === name) }"""
BUILDERS = {
    # LoRAs A and B in a subgraph nested in one holding WeightedBlend (its weight promoted, set to 0.5;
    # text_encoder_weight not promoted) and a bypassed Fuse; native reroutes on a root link and an inner one.
    "subgraph_nested": """async () => {
        const LG = window.LiteGraph, g = window.app.graph, n = id => g.getNodeById(id), promote = PROMOTE, ours = OURS;
        const fuse = LG.createNode(ours("Fuse")); fuse.pos = [900, 400]; g.add(fuse);
        n(4).connect(0, fuse, 0); fuse.connect(0, n(5), 0); fuse.mode = 4;
        const outer = g.convertToSubgraph(new Set([n(2), n(3), n(4), fuse])).node;
        const sub = outer.subgraph;
        const inner = sub.convertToSubgraph(new Set([sub.getNodeById(2), sub.getNodeById(3)])).node;
        promote(outer, sub.getNodeById(4), "weight").value = 0.5;
        g.createReroute([300, 300], g.links.get(outer.inputs[0].link));
        const blend = sub.getNodeById(4);
        sub.createReroute([300, 500], sub.links.get(blend.inputs[1].link));
        return [outer.id, inner.id] }""",
    # One subgraph (a LoadLoRA, lora_name promoted) used twice with demo-a and demo-b; a bypassed subgraph
    # node (a Fuse inside) on the model link; a legacy Reroute node, a PrimitiveNode on Sample's seed and
    # a muted PreviewImage.
    "subgraph_twice": """async () => {
        const LG = window.LiteGraph, g = window.app.graph, n = id => g.getNodeById(id), promote = PROMOTE, ours = OURS;
        const first = g.convertToSubgraph(new Set([n(2)])).node;
        promote(first, first.subgraph.nodes[0], "lora_name").value = "demo-a.safetensors";
        const second = LG.createNode(first.subgraph.id); second.pos = [50, 650]; g.add(second);
        second.connect(0, n(4), 2); g.remove(n(3));
        second.widgets.find(w => w.name === "lora_name").value = "demo-b.safetensors";
        const fuse = LG.createNode(ours("Fuse")); fuse.pos = [300, 50]; g.add(fuse);
        n(1).connect(0, fuse, 0); fuse.connect(0, n(4), 0);
        g.convertToSubgraph(new Set([fuse])).node.mode = 4;
        const reroute = LG.createNode("Reroute"); reroute.pos = [900, 600]; g.add(reroute);
        n(5).connect(0, reroute, 0); reroute.connect(0, n(6), 0);
        const primitive = LG.createNode("PrimitiveNode"); primitive.pos = [400, 700]; g.add(primitive);
        primitive.connect(0, n(5), n(5).inputs.findIndex(i => i.name === "seed"));
        primitive.widgets[0].value = 7; primitive.widgets[1].value = "fixed";
        const preview = LG.createNode("PreviewImage"); preview.pos = [900, 800]; g.add(preview);
        n(5).connect(0, preview, 0); preview.mode = 2;
        return [first.id, second.id] }""",
    # A subgraph node as frontends before subgraph-input promotion saved it: the widgets it shows listed
    # in properties.proxyWidgets (WeightedBlend's weight, LoRA B's name), their values in widgets_values in
    # that order. The page saves the file its way, the builder rewrites the subgraph node the old way
    # and returns that file; the page loads it (turning the list into subgraph inputs) and queues.
    "subgraph_proxy_widgets": """async () => {
        const g = window.app.graph, n = id => g.getNodeById(id);
        const host = g.convertToSubgraph(new Set([n(2), n(3), n(4)])).node;
        const wf = JSON.parse(JSON.stringify((await window.app.graphToPrompt()).workflow));
        const saved = wf.nodes.find(node => node.id == host.id);
        saved.properties.proxyWidgets = [["4", "weight"], ["3", "lora_name"]];
        saved.widgets_values = [0.25, "demo-a.safetensors"];
        delete saved.widgets_values_named;
        return wf }""",
    # A PrimitiveNode on a subgraph node's promoted input (weight): the editor writes its value into
    # the subgraph node's widget, then resolves the linked input past it to the inner widget's own value
    # (0.7: neither 0.33 nor the promoted 0.5).
    "subgraph_primitive": """async () => {
        const LG = window.LiteGraph, g = window.app.graph, n = id => g.getNodeById(id), promote = PROMOTE, ours = OURS;
        const host = g.convertToSubgraph(new Set([n(4)])).node;
        promote(host, host.subgraph.nodes[0], "weight").value = 0.5;
        const primitive = LG.createNode("PrimitiveNode"); primitive.pos = [100, 900]; g.add(primitive);
        primitive.connect(0, host, host.inputs.findIndex(i => i.name === "weight"));
        primitive.widgets[0].value = 0.33; primitive.widgets[1].value = "fixed";
        return host.id }""",
}
LEGACY = {"subgraph_proxy_widgets"}  # stored as the builder writes it, with no 1.0 form


def queued_prompt(editor) -> dict:
    """The prompt of the POST /prompt body the page sends when queued (answered here, not run)."""
    posted = []

    def answer(route):
        if route.request.method != "POST":
            return route.continue_()
        posted.append(json.loads(route.request.post_data))
        return route.fulfill(json={"prompt_id": f"made-{len(posted)}", "number": 0, "node_errors": {}})

    editor.page.route("**/prompt", answer)
    try:
        assert editor.page.evaluate("window.app.queuePrompt(0, 1)") is not False, "the page queued the prompt"
    finally:
        editor.page.unroute("**/prompt", answer)
    assert len(posted) == 1, "one POST /prompt"
    return posted[0]["prompt"]


def load_and_queue(editor, workflow: dict) -> dict:
    """Load a saved workflow into a cleared page and queue it: the prompt it sends."""
    editor.page.evaluate("window.app.rootGraph.clear()")
    editor.page.evaluate("async wf => { await window.app.loadGraphData(wf) }", workflow)
    assert editor.problems == [], "the page loads the file with no error:\n" + "\n".join(editor.problems)
    assert editor.missing_node_types() == [], "every node type is known, subgraph nodes included"
    assert editor.page.evaluate("window.app.rootGraph.nodes.length") > 0, "the file loaded"
    return queued_prompt(editor)


def make_in_editor(editor, name: str) -> dict:
    """Build workflow ``name`` in the page: ``{"saved": ..., "v1": ..., "prompt": ...}``, the prompt being
    what the page queues for each saved form loaded again (they must agree)."""
    editor.load("blend")
    built = editor.page.evaluate(BUILDERS[name].replace("PROMOTE", PROMOTE_JS).replace("OURS", OURS_JS))
    if name in LEGACY:
        return {"saved": built, "prompt": load_and_queue(editor, built)}
    # As JSON text, as the editor's Save writes it: a value left undefined is left out, not null.
    saved = json.loads(editor.page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).workflow)"))
    v1 = json.loads(editor.page.evaluate("JSON.stringify(window.app.rootGraph.asSerialisable())"))
    assert v1["version"] == 1 and isinstance(v1["links"][0], dict), "the 1.0 schema: links are objects"
    prompt = load_and_queue(editor, saved)
    assert load_and_queue(editor, v1) == prompt, f"{name}: both saved forms queue the same prompt"
    return {"saved": saved, "v1": v1, "prompt": prompt}


def editor_made_files(name: str) -> dict:
    forms = (("saved", ""), ("prompt", "_prompt")) + ((("v1", "_v1"),) if name not in LEGACY else ())
    return {form: EDITOR_MADE / f"{name}{suffix}.json" for form, suffix in forms}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_editor_made_workflows_are_remade_as_stored(editor, name):
    """The stored test data is what the shipped editor makes today: remade, the page queues the stored
    prompt, and each stored file loaded into the page queues it too."""
    made = make_in_editor(editor, name)
    files = editor_made_files(name)
    stored = json.loads(files["prompt"].read_text())
    assert made["prompt"] == stored, f"{name}: re-make it with `python tests/server/test_browser.py`"
    for form in ("saved", "v1"):
        if form in files:
            assert load_and_queue(editor, json.loads(files[form].read_text())) == stored, f"{name} ({form})"
    assert editor.problems == [], "\n".join(editor.problems)


@pytest.mark.parametrize("name", SHIPPED)
def test_a_converted_api_workflow_opens_in_the_editor_in_the_1_0_schema(editor, name):
    """`loraloom convert --to ui` writes the 1.0 schema: the page loads it with no error and no missing
    node, and queues exactly the prompt our converter reads from the file, which means the API file."""
    from loraloom.graph_runtime.workflow import api_to_ui, ui_to_api

    registry = editor.runtime.registry
    api = json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())
    ui = api_to_ui(api, registry)
    assert ui["version"] == 1
    queued = load_and_queue(editor, ui)
    assert queued == ui_to_api(ui, registry), f"{name}: the page and our converter read the 1.0 file alike"
    assert editor.runtime.validate({"prompt": queued}).nodes == editor.runtime.validate(api).nodes, name
    assert editor.problems == [], "\n".join(editor.problems)


def test_an_editor_made_subgraph_workflow_runs_on_our_server(editor):
    """Queued from the page for real: our server validates and runs the ids it gets ("7:2", "8:2")."""
    editor.page.evaluate("window.app.rootGraph.clear()")
    workflow = json.loads((EDITOR_MADE / "subgraph_twice.json").read_text())
    for node in workflow["nodes"]:  # small, so it runs in seconds
        if node["type"].removeprefix("LoraLoom") == "Sample":
            node["widgets_values"][4:8] = [2, 5.0, 64, 64]
    editor.page.evaluate("async wf => { await window.app.loadGraphData(wf) }", workflow)
    store = editor.server.app[STATE].store
    before = len(store.history())
    assert editor.page.evaluate("window.app.queuePrompt(0, 1)") is not False, "the page queued the prompt"
    for _ in range(12_000):  # a minute at most
        if len(store.history()) > before:
            break
        time.sleep(0.005)
    last = store.history()[-1]
    assert last.status == "success", last.messages
    assert {"7:2", "8:2"} <= set(last.prompt), "the nodes inside the two subgraph instances ran under their ids"
    assert editor.problems == [], "\n".join(editor.problems)


def _remake(names: list[str]) -> None:
    """Write tests/workflows/editor/ from the editor (run this file as a script, naming the workflows to
    re-make, or none for all)."""
    import tempfile

    from playwright.sync_api import sync_playwright

    EDITOR_MADE.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as root:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True)
        with open_editor(browser, Path(root)) as ed:
            for name in names or sorted(BUILDERS):
                made = make_in_editor(ed, name)
                for form, path in editor_made_files(name).items():
                    path.write_text(json.dumps(made[form], indent=2) + "\n")
                print(f"wrote {name}: {', '.join(p.name for p in editor_made_files(name).values())}")
            assert ed.problems == [], "\n".join(ed.problems)
        browser.close()


if __name__ == "__main__":
    import sys

    _remake(sys.argv[1:])
