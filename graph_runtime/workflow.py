"""Workflow JSON in both formats ComfyUI writes, converted to one API-format prompt.

API format: ``{"<id>": {"class_type": ..., "inputs": {name: value | ["<src id>", slot]}}}``.
UI format (version 0.4, links as lists, and the 1.0 schema, links as objects): ``nodes`` and
``links``; widget values are mapped to input names through the node schema's widget order (the
``control_after_generate`` value the editor stores after some widgets is skipped; files with and
without it are read). Subgraphs (``definitions.subgraphs``) are unfolded into the prompt the shipped
editor queues: muted nodes dropped, bypassed nodes passing on an input, Reroute and PrimitiveNode
resolved, links followed through subgraph boundaries (see `_Flattener`). `api_to_ui` writes 1.0.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WorkflowError
from .files import FileError, changed_while_reading, open_regular, read_upto, state_of
from .jsonio import MAX_WORKFLOW_BYTES, check_depth, load_json_file, loads_strict
from .schema import CONTROL_VALUES, Input, NodeRegistry

FRONTEND_ONLY = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
MODE_MUTED = 2
MODE_BYPASS = 4
MAX_NODES = 100_000
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_KEYS = ("prompt", "workflow")
_MAX_KEYWORD_BYTES = 80  # PNG keywords are 1-79 bytes
MAX_PNG_CHUNKS = 1_000_000


@dataclass
class Workflow:
    """A workflow ready for validation: the API-format prompt, and the UI graph it came from."""

    prompt: dict
    ui: dict | None = None
    source: str = "workflow"
    extra: dict = field(default_factory=dict)


def is_link(value) -> bool:
    """Whether an input value is a link ``[node_id, slot]`` (ComfyUI's API form)."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def load_workflow(src, registry: NodeRegistry) -> Workflow:
    """Read a workflow from a path (.json, or a .png with an embedded workflow), an API dict or a UI dict."""
    if isinstance(src, Workflow):
        return Workflow(check_api(src.prompt, src.source), src.ui, src.source, dict(src.extra))
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        source = str(path)
        locate = functools.partial(locate_in_workflow, registry=registry)
        if path.suffix.lower() == ".png":
            data = _png_workflow(path, locate)
        else:
            data = load_json_file(path, locate=locate)
    elif isinstance(src, dict):
        source = "workflow"
        check_depth(src, source=source)
        data = src  # not copied: check_api and ui_to_api build fresh node and input dicts
    else:
        raise WorkflowError(f"a workflow must be a path, an API-format dict or a UI-format dict, "
                            f"not {type(src).__name__}")
    if not isinstance(data, dict):
        raise WorkflowError(f"{source}: a workflow is a JSON object, not {type(data).__name__}")
    if "nodes" in data and "links" in data:
        return Workflow(ui_to_api(data, registry, source), data, source)
    if isinstance(data.get("prompt"), dict):  # the body ComfyUI's POST /prompt takes
        ui = (data.get("extra_data") or {}).get("extra_pnginfo", {}).get("workflow") \
            if isinstance(data.get("extra_data"), dict) else None
        data = data["prompt"]
        return Workflow(check_api(data, source), ui if isinstance(ui, dict) else None, source)
    return Workflow(check_api(data, source), None, source)


def locate_in_workflow(data, path: list, registry: NodeRegistry) -> dict | None:
    """Where a JSON path points in a workflow, as error fields: ``{"node": "5", "class_type": "Sample",
    "input": "width"}`` for an input of an API-format node (also inside a ``POST /prompt`` body) or a
    widget value of a UI-format node (named through the node's schema as `ui_to_api` names it); the
    node alone for another place in a node; None elsewhere."""
    if path[:1] == ["prompt"] and isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data, path = data["prompt"], path[1:]
    if not isinstance(data, dict) or len(path) < 2:
        return None
    if path[:2] == ["definitions", "subgraphs"] and len(path) >= 5 and path[3] == "nodes":
        # A node of a subgraph definition: its id there and its class (each instance gives it another
        # prompt id, so the input is left to the JSON path, which names the subgraph too).
        try:
            node = data["definitions"]["subgraphs"][path[2]]["nodes"][path[4]]
        except (KeyError, IndexError, TypeError):
            return None
        return {"node": str(node.get("id")), "class_type": node.get("type")} if isinstance(node, dict) else None
    if "nodes" in data and path[0] == "nodes" and isinstance(data["nodes"], list):
        node = data["nodes"][path[1]] if isinstance(path[1], int) else None
        if not isinstance(node, dict):
            return None
        where = {"node": str(node.get("id")), "class_type": node.get("type")}
        if len(path) >= 4 and path[2] == "widgets_values":
            cls = registry.get(node.get("type"))
            slots = _widget_names_by_index(cls.SCHEMA.widgets, node["widgets_values"]) if cls is not None else {}
            name = path[3] if isinstance(path[3], str) else slots.get(path[3])
            if name is not None:
                where["input"] = name
        return where
    node = data.get(path[0])
    if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) or "links" in data:
        return None
    where = {"node": str(path[0]), "class_type": node["class_type"]}
    if path[1] == "inputs" and len(path) >= 3:
        where["input"] = path[2]
    return where


def check_api(prompt: dict, source: str = "workflow") -> dict:
    """Check the shape of an API-format prompt and return it with string node ids."""
    if not isinstance(prompt, dict):
        raise WorkflowError(f"{source}: an API workflow is an object of nodes, not {type(prompt).__name__}")
    if len(prompt) > MAX_NODES:
        raise WorkflowError(f"{source}: {len(prompt)} nodes is above the limit of {MAX_NODES}")
    out = {}
    for node_id, entry in prompt.items():
        where = f"{source}: node {node_id}"
        if not isinstance(entry, dict):
            raise WorkflowError(f"{where}: expected an object with 'class_type' and 'inputs', "
                                f"got {type(entry).__name__}. Is this a workflow file?")
        class_type = entry.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            raise WorkflowError(f"{where}: 'class_type' must be a node id string, got {class_type!r}")
        inputs = entry.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(f"{where} ({class_type}): 'inputs' must be an object, got {type(inputs).__name__}")
        node = {"class_type": class_type, "inputs": dict(inputs)}
        if isinstance(entry.get("_meta"), dict):
            node["_meta"] = entry["_meta"]
        out[str(node_id)] = node
    return out


def apply_overrides(prompt: dict, overrides, source: str = "workflow") -> dict:
    """Set inputs: ``{"3.weight": 0.5}`` or ``{"3": {"weight": 0.5}}``. Unknown node ids are errors."""
    if not overrides:
        return prompt
    flat: list[tuple[str, str, object]] = []
    for key, value in dict(overrides).items():
        if isinstance(value, dict) and "." not in str(key):
            flat.extend((str(key), name, v) for name, v in value.items())
        else:
            node_id, sep, name = str(key).partition(".")
            if not sep or not node_id or not name:
                raise WorkflowError(f"override {key!r}: expected NODE_ID.INPUT, e.g. '3.weight'", key=str(key),
                                    kind="bad_override")
            flat.append((node_id, name, value))
    for node_id, name, value in flat:
        if node_id not in prompt:
            ids = ", ".join(sorted(prompt, key=_id_sort)[:20])
            raise WorkflowError(f"override {node_id}.{name}: {source} has no node {node_id} (nodes: {ids})",
                                key=f"{node_id}.{name}", value=node_id, kind="override_unknown_node")
        prompt[node_id]["inputs"][name] = value
    return prompt


SEED_AXIS = "seed"


def axis_error(message: str, target: str | None = None, value=None, fix: str | None = None) -> WorkflowError:
    """A sweep axis that cannot be read or set (kind ``bad_axis``), naming its target."""
    return WorkflowError(message, key=target, value=value, kind="bad_axis", fix=fix)


def parse_axis(text: str) -> tuple[str, list]:
    """The command line's ``NODE_ID.INPUT=V1,V2,...`` (or ``=[JSON list]``) as ``(target, values)``;
    values split at commas stay text until `build_spec` types them by the input's schema."""
    target, sep, raw = text.partition("=")
    target = target.strip()
    node_id, dot, name = target.partition(".")
    if not (sep and dot and node_id and name):
        raise axis_error(f"axis {text!r}: expected NODE_ID.INPUT=V1,V2,..., e.g. 4.weight=0,0.5,1", value=text)
    raw = raw.strip()
    if raw.startswith("["):
        values = loads_strict(raw, source=f"axis {target}")
        if not isinstance(values, list):
            raise axis_error(f"axis {target}: {raw!r} is not a JSON list", target, raw)
        return target, values
    return target, [part.strip() for part in raw.split(",")]


def parse_seeds(text: str) -> list:
    """``--seeds 1,2,3`` or a JSON list: the seeds as they came (typed later)."""
    text = text.strip()
    if text.startswith("["):
        values = loads_strict(text, source="--seeds")
        if not isinstance(values, list):
            raise axis_error(f"--seeds {text!r} is not a JSON list", SEED_AXIS, text)
        return values
    return [part.strip() for part in text.split(",")]


def _id_sort(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def ui_to_api(ui: dict, registry: NodeRegistry, source: str = "workflow") -> dict:
    """Convert the editor's UI-format graph (version 0.4 or 1.0, subgraphs included) into the API-format
    prompt the shipped editor queues for it (its ``graphToPrompt``): a node inside a subgraph gets the
    id path of the subgraph nodes above it and its own id joined by ``:`` ("5:3", "5:8:2")."""
    return with_titles(_Flattener(ui, registry, source).prompt(), registry)


# How the editor (frontend 1.58, its graphToPrompt and ExecutableNodeDTO) turns a saved graph into a
# prompt, restated: every node that is not muted, bypassed or virtual (Reroute, PrimitiveNode, Note,
# a subgraph node) becomes one prompt node; a subgraph node (mode 0) is replaced by the nodes of its
# definition, each with the id path of the subgraph nodes above it; each linked input is resolved to
# a real node's output by walking back through reroutes, bypassed nodes (the input chosen by type, as
# the editor chooses it) and subgraph boundaries; an input whose source resolves to nothing keeps its
# widget value, if it has one, and is dropped otherwise.
SUBGRAPH_INPUT = "-10"  # the origin id of a link from a subgraph's input node (-20: to its output node)
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)


@dataclass
class _Graph:
    """One graph of a UI file, the root or a subgraph definition: its nodes by id, its links by id
    as ``(origin id, origin slot, type, target id, target slot)``; for a definition its inputs and outputs."""

    label: str  # "" for the root; "subgraph 'Name' (id)" for a definition
    nodes: dict
    links: dict
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


@dataclass(frozen=True)
class _Scope:
    """Where a node is: the graph, the ids of the subgraph nodes above it, the subgraph node it is
    inside (in the parent scope), and the definitions on the way down (to refuse a subgraph inside itself)."""

    graph: _Graph
    path: tuple = ()
    host: dict | None = None
    parent: "_Scope | None" = None
    chain: tuple = ()


class _Flattener:
    """A UI-format graph (0.4 or 1.0, with subgraph definitions) read into the prompt the editor queues."""

    def __init__(self, ui: dict, registry: NodeRegistry, source: str):
        self.registry = registry
        self.source = source
        self.root = self._graph(ui, "", root=True)
        self.defs: dict[str, _Graph] = {}
        definitions = ui.get("definitions")
        if definitions is not None and not isinstance(definitions, dict):
            raise WorkflowError(f"{source}: 'definitions' must be an object, got {type(definitions).__name__}")
        for i, sub in enumerate(_list((definitions or {}).get("subgraphs"), f"{source}: definitions.subgraphs")):
            if not isinstance(sub, dict) or not isinstance(sub.get("id"), str) or not sub["id"]:
                raise WorkflowError(f"{source}: definitions.subgraphs[{i}] needs a string 'id'", kind="subgraph")
            label = f"subgraph {sub.get('name')!r} ({sub['id']})"
            if sub["id"] in self.defs:
                raise WorkflowError(f"{source}: {label} is defined twice in definitions.subgraphs", kind="subgraph")
            self.defs[sub["id"]] = self._graph(sub, label)
        if len(self.root.nodes) + sum(len(d.nodes) for d in self.defs.values()) > MAX_NODES:
            raise WorkflowError(f"{source}: more than {MAX_NODES} nodes", limit=MAX_NODES)

    def _graph(self, data: dict, label: str, root: bool = False) -> _Graph:
        where = f"{self.source}: {label}" if label else self.source
        nodes, links = data.get("nodes"), data.get("links")
        if not isinstance(nodes, list) or not isinstance(links, list):
            raise WorkflowError(f"{where}: a UI workflow needs 'nodes' and 'links' lists",
                                kind="subgraph" if label else None)
        if len(nodes) > MAX_NODES:
            raise WorkflowError(f"{where}: {len(nodes)} nodes is above the limit of {MAX_NODES}", limit=MAX_NODES)
        by_id = {}
        for i, node in enumerate(nodes):
            if not isinstance(node, dict) or not isinstance(node.get("type"), str) \
                    or isinstance(node.get("id"), bool) or not isinstance(node.get("id"), (int, str)):
                raise WorkflowError(f"{where}: nodes[{i}] needs an integer 'id' and a string 'type'")
            _list(node.get("inputs"), f"{where}: node {node['id']} 'inputs'")
            by_id[str(node["id"])] = node
        graph = _Graph(label, by_id, _links(links, where))
        if not root:
            graph.inputs = _list(data.get("inputs"), f"{where}: 'inputs'")
            graph.outputs = _list(data.get("outputs"), f"{where}: 'outputs'")
            if not all(isinstance(s, dict) for s in graph.inputs + graph.outputs):
                raise WorkflowError(f"{where}: each of its inputs and outputs must be an object", kind="subgraph")
        return graph

    def prompt(self) -> dict:
        """The API-format prompt, in the order the nodes are met (a subgraph's nodes after its node)."""
        out: dict[str, dict] = {}
        linked: list[tuple[dict, str]] = []  # inputs set to a link, checked once every node is known
        visited = 0
        stack = [(_Scope(self.root), n) for n in reversed(list(self.root.nodes.values()))]
        while stack:
            scope, node = stack.pop()
            visited += 1
            if visited > MAX_NODES:
                raise WorkflowError(f"{self.source}: its subgraphs unfold into more than {MAX_NODES} nodes",
                                    limit=MAX_NODES, kind="subgraph")
            off = node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS)
            if off and not scope.path:
                continue
            sub = self._definition(scope, node)
            if sub is not None:
                # The editor leaves out the nodes of a muted or bypassed subgraph node only at the top
                # level: inside a subgraph it unfolds one whatever its mode (its graphToPrompt checks
                # the mode of the root's nodes, then of each node unfolded), so each inner node's own
                # mode decides; links to the subgraph node's outputs still see it muted or bypassed.
                child = self._child(scope, node, sub)
                stack.extend((child, n) for n in reversed(list(sub.nodes.values())))
            elif not off and node["type"] not in FRONTEND_ONLY:
                node_id = _exec_id(scope, node)
                out[node_id] = self._entry(scope, node, linked)
        for inputs, name in linked:  # the editor drops a link to a node that is not in the prompt
            if is_link(inputs.get(name)) and inputs[name][0] not in out:
                del inputs[name]
        return out

    def _entry(self, scope: _Scope, node: dict, linked: list) -> dict:
        inputs = _widget_inputs(node, self.registry, self.source)
        inputs.update(self._proxied(scope).get(str(node["id"]), {}))
        for k, inp in enumerate(node.get("inputs") or []):
            if not isinstance(inp, dict) or inp.get("link") is None:
                continue
            widget = inp.get("widget")
            name = widget.get("name") if isinstance(widget, dict) and widget.get("name") else inp.get("name")
            if not isinstance(name, str):
                raise self._error(scope, node, "an input has no name")
            resolved = self._resolve(scope, node, k)
            if resolved is None:
                continue  # a widget keeps its own value, as in the editor
            if resolved[0] == "value":
                inputs[name] = resolved[1]
            else:
                inputs[name] = [resolved[1], resolved[2]]
                linked.append((inputs, name))
        entry = {"class_type": node["type"], "inputs": inputs}
        meta = {"title": node["title"]} if isinstance(node.get("title"), str) else {}
        props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        meta.update({k: props[k] for k in ("cnr_id", "aux_id", "ver") if isinstance(props.get(k), str)})
        if meta:
            entry["_meta"] = meta
        return entry

    def _proxied(self, scope: _Scope) -> dict:
        """Widgets promoted the older way (frontends before subgraph-input promotion): the subgraph
        node's ``properties.proxyWidgets`` lists ``[inner node id, widget name]`` (a list or its JSON
        text), and its ``widgets_values`` holds their values in that order. The shipped editor turns
        them into subgraph inputs on load, a value the list lacks leaving the inner widget's own:
        ``{inner node id: {widget: value}}``."""
        host = scope.host
        props = host.get("properties") if host is not None else None
        entries = props.get("proxyWidgets") if isinstance(props, dict) else None
        if isinstance(entries, str):
            try:
                entries = json.loads(entries)
            except ValueError:
                return {}  # the editor warns and ignores it
        values = host.get("widgets_values") if host is not None else None
        if not isinstance(entries, list) or not isinstance(values, list):
            return {}
        out: dict = {}
        for entry, value in zip(entries, values):
            if isinstance(entry, list) and len(entry) >= 2 and all(isinstance(e, (str, int)) for e in entry[:2]):
                out.setdefault(str(entry[0]), {})[str(entry[1])] = value
        return out

    def _definition(self, scope: _Scope, node: dict) -> _Graph | None:
        """The subgraph a node is an instance of (its type is the definition's id), else None."""
        sub = self.defs.get(node["type"])
        if sub is None and _UUID.match(node["type"]) and self.registry.get(node["type"]) is None:
            raise self._error(scope, node, f"it is an instance of subgraph {node['type']}, which is not in "
                                           f"definitions.subgraphs (defined: {', '.join(self.defs) or 'none'})",
                              kind="subgraph",
                              fix="open the file in the editor from where the subgraph was made and save it again")
        return sub

    def _child(self, scope: _Scope, node: dict, sub: _Graph) -> _Scope:
        sub_id = node["type"]
        if sub_id in scope.chain:
            names = " -> ".join(self.defs[s].label for s in scope.chain + (sub_id,))
            raise self._error(scope, node, f"{sub.label} contains itself: {names}", kind="subgraph_cycle",
                              fix="a subgraph cannot hold an instance of itself, directly or nested")
        return _Scope(sub, scope.path + (str(node["id"]),), node, scope, scope.chain + (sub_id,))

    def _inputs(self, scope: _Scope, node: dict) -> list:
        """A node's input sockets as the editor holds them: a subgraph node's are its definition's
        inputs, each linked as the instance's input of that name is."""
        sub = self.defs.get(node["type"])
        if sub is None:
            return [i if isinstance(i, dict) else {} for i in node.get("inputs") or []]
        saved = {i["name"]: i for i in node.get("inputs") or []
                 if isinstance(i, dict) and isinstance(i.get("name"), str)}
        return [{**s, "link": saved.get(s["name"], {}).get("link") if isinstance(s.get("name"), str) else None}
                for s in sub.inputs]

    def _outputs(self, node: dict) -> list:
        sub = self.defs.get(node["type"])
        outs = sub.outputs if sub is not None else node.get("outputs") or []
        return [o if isinstance(o, dict) else {} for o in outs]

    def _resolve(self, scope: _Scope, node: dict, slot: int):
        """Where input ``slot`` of ``node`` gets its value: ``("link", prompt id, output slot)``,
        ``("value", v)`` (a PrimitiveNode's or a promoted widget's) or None (nothing: muted, unlinked)."""
        # A PrimitiveNode's value reaches an input only straight or through legacy Reroutes: the editor
        # writes it into the widget of the node its links end at (its applyToGraph) and resolves the
        # link itself to nothing, so behind a bypassed node or a subgraph boundary it is not used.
        op, want, seen, direct = "in", None, set(), True
        for _ in range(4 * MAX_NODES):
            key = (scope.path, str(node["id"]), op, slot)
            if key in seen:
                raise self._error(scope, node, "its links loop back to it (through reroutes, bypassed nodes or "
                                               "subgraph boundaries)", kind="link_cycle")
            seen.add(key)
            if op == "in":
                inputs = self._inputs(scope, node)
                if slot >= len(inputs):
                    raise self._error(scope, node, f"it has no input slot {slot}", value=slot)
                link_id = inputs[slot].get("link")
                if link_id is None:
                    return None
                if not _is_id(link_id):
                    raise self._error(scope, node, f"input slot {slot} has link {link_id!r}, not a link id number",
                                      value=link_id, kind="bad_link")
                link = scope.graph.links.get(link_id)
                if link is None:
                    raise self._error(scope, node, f"link {link_id} is used by a node but missing from 'links'",
                                      input=inputs[slot].get("name"), value=link_id, kind="dangling_link")
                origin, origin_slot = link[0], link[1]
                want = want or inputs[slot].get("type")
                if origin == SUBGRAPH_INPUT:
                    if scope.host is None:
                        raise self._error(scope, node, f"link {link_id} comes from a subgraph input, but the node "
                                                       "is not inside a subgraph", value=link_id, kind="dangling_link")
                    host_inputs = self._inputs(scope.parent, scope.host)
                    if origin_slot >= len(host_inputs):
                        raise self._error(scope, node, f"link {link_id} comes from subgraph input {origin_slot}, "
                                                       "which the subgraph does not have", value=link_id,
                                          kind="dangling_link")
                    if host_inputs[origin_slot].get("link") is None:
                        return self._promoted(scope, origin_slot)
                    scope, node, slot, want, direct = scope.parent, scope.host, origin_slot, None, False
                    continue
                src = scope.graph.nodes.get(origin)
                if src is None:
                    raise self._error(scope, node, f"link {link_id} comes from node {origin}, which is not in "
                                                   "the graph", input=inputs[slot].get("name"), value=origin,
                                      kind="dangling_link")
                node, slot, op = src, origin_slot, "out"
                continue
            mode = node.get("mode", 0)
            if mode == MODE_MUTED:
                return None
            if mode == MODE_BYPASS:
                slot, op, want, direct = self._bypass_slot(node, slot, want), "in", None, False
                if slot < 0:
                    return None
                continue
            sub = self.defs.get(node["type"])
            if sub is not None:
                outs = sub.outputs
                ids = (outs[slot].get("linkIds") if slot < len(outs) else None) or []
                if not ids:
                    return None
                if not isinstance(ids, list) or not _is_id(ids[0]):
                    raise self._error(scope, node, f"output {slot} of {sub.label} has linkIds {ids!r}, not a list "
                                                   "of link id numbers", value=ids, kind="bad_link")
                link = sub.links.get(ids[0])
                if link is None:
                    raise self._error(scope, node, f"output {slot} of {sub.label} uses link {ids[0]}, which is "
                                                   "missing from its 'links'", value=ids[0], kind="dangling_link")
                direct = False
                if link[0] == SUBGRAPH_INPUT:  # an input wired straight to an output
                    slot, op = link[1], "in"
                    continue
                child = self._child(scope, node, sub)
                src = sub.nodes.get(link[0])
                if src is None:
                    raise self._error(scope, node, f"output {slot} of {sub.label} comes from node {link[0]}, "
                                                   "which is not in the subgraph", value=link[0],
                                      kind="dangling_link")
                scope, node, slot = child, src, link[1]
                continue
            if node["type"] == "Reroute":
                slot, op = 0, "in"
                continue
            if node["type"] == "PrimitiveNode":
                values = node.get("widgets_values")
                return ("value", values[0]) if direct and isinstance(values, list) and values else None
            if node["type"] in FRONTEND_ONLY:
                return None
            return ("link", _exec_id(scope, node), slot)
        raise self._error(scope, node, "its links are too long to follow", limit=4 * MAX_NODES)

    def _promoted(self, scope: _Scope, slot: int):
        """The value a subgraph node holds for its input ``slot`` when that input is a promoted widget
        (linked inside to a widget) and unlinked outside: named, else by position among the promoted."""
        sub, host = scope.graph, scope.host
        promoted = [i for i, s in enumerate(sub.inputs) if self._is_widget_input(sub, s)]
        if slot not in promoted:
            return None
        name = sub.inputs[slot].get("name")
        named = host.get("widgets_values_named")
        values = host.get("widgets_values")
        if not isinstance(name, str):
            return None
        if isinstance(named, dict) and name in named:
            return ("value", named[name])
        if isinstance(values, dict) and name in values:
            return ("value", values[name])
        if isinstance(values, list) and promoted.index(slot) < len(values):
            return ("value", values[promoted.index(slot)])
        return None

    def _is_widget_input(self, sub: _Graph, sub_input: dict) -> bool:
        ids = sub_input.get("linkIds")
        for link_id in ids if isinstance(ids, list) else []:
            link = sub.links.get(link_id) if _is_id(link_id) else None
            target = sub.nodes.get(link[3]) if link else None
            for inp in (target or {}).get("inputs") or []:
                if isinstance(inp, dict) and inp.get("link") == link_id and inp.get("widget"):
                    return True
        return False

    def _bypass_slot(self, node: dict, slot: int, want) -> int:
        """The input a bypassed node passes to output ``slot``, chosen as the editor chooses it: the
        same slot when its type fits both ends, else the first input of the wanted type, else the first
        that fits both; -1 when none does."""
        inputs = self._inputs_types(node)
        outs = self._outputs(node)
        out_type = outs[slot].get("type") if slot < len(outs) else None
        if want in ("*", ""):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs) and _fits_type(inputs[slot], out_type) and _fits_type(inputs[slot], want):
            return slot
        if want in inputs:
            return inputs.index(want)
        return next((i for i, t in enumerate(inputs) if _fits_type(t, out_type) and _fits_type(t, want)), -1)

    def _inputs_types(self, node: dict) -> list:
        sub = self.defs.get(node["type"])
        sockets = sub.inputs if sub is not None else node.get("inputs") or []
        return [i.get("type") if isinstance(i, dict) else None for i in sockets]

    def _error(self, scope: _Scope, node: dict, message: str, **fields) -> WorkflowError:
        """An error at ``node`` (its prompt id and type), naming the subgraph it is in."""
        inside = f" (in {scope.graph.label})" if scope.graph.label else ""
        return WorkflowError(message + inside, file=None if self.source == "workflow" else self.source,
                             node=_exec_id(scope, node), class_type=node["type"], **fields)


def _is_id(value) -> bool:
    """A link id or slot as the editor writes them: an integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _exec_id(scope: _Scope, node: dict) -> str:
    return ":".join(scope.path + (str(node["id"]),))


def _fits_type(a, b) -> bool:
    """LiteGraph's isValidConnection: "*", "" and no type fit anything; "A,B" fits A and B."""
    a = None if a in ("*", "", 0) else a
    b = None if b in ("*", "", 0) else b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower().split(","), str(b).lower().split(",")
    return bool(set(a) & set(b))


def _links(links: list, where: str) -> dict:
    """link id -> (origin id, origin slot, type, target id, target slot), from the 0.4 list form
    ``[id, origin, slot, target, slot, type]`` or the 1.0 object form."""
    out = {}
    for i, link in enumerate(links):
        if isinstance(link, list) and len(link) >= 5:
            link_id, origin, origin_slot, target, target_slot = link[:5]
            link_type = link[5] if len(link) > 5 else None
        elif isinstance(link, dict):
            link_id, origin, origin_slot = link.get("id"), link.get("origin_id"), link.get("origin_slot")
            target, target_slot, link_type = link.get("target_id"), link.get("target_slot"), link.get("type")
        else:
            raise WorkflowError(f"{where}: links[{i}] must be [id, from_node, from_slot, to_node, to_slot, type] "
                                "or an object with id, origin_id, origin_slot, target_id, target_slot")
        if not (_is_id(link_id) and _is_id(origin_slot) and origin_slot >= 0) \
                or any(isinstance(v, bool) or not isinstance(v, (int, str)) for v in (origin, target)):
            raise WorkflowError(f"{where}: links[{i}] has a malformed id, node or slot: {link!r}", kind="bad_link")
        out[link_id] = (str(origin), origin_slot, link_type, str(target), target_slot)
    return out


def with_titles(prompt: dict, registry: NodeRegistry) -> dict:
    """``prompt`` with ``_meta.title`` on every node, as ComfyUI's editor exports the API format: the
    node's own title, else its class's display name (what the editor shows on a node nobody renamed;
    a UI file stores a title only when it differs), else the class id. API clients find nodes by it."""
    out = {}
    for node_id, entry in prompt.items():
        meta = entry.get("_meta") if isinstance(entry.get("_meta"), dict) else {}
        if not isinstance(meta.get("title"), str):
            cls = registry.get(entry["class_type"])
            meta = {**meta, "title": cls.SCHEMA.display_name if cls else entry["class_type"]}
        out[node_id] = {**entry, "_meta": meta}
    return out


def _list(value, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise WorkflowError(f"{where} must be a list, got {type(value).__name__}")
    return value


def _widget_inputs(node: dict, registry: NodeRegistry, source: str) -> dict:
    cls = registry.get(node["type"])
    values = node.get("widgets_values")
    if cls is None or values is None:
        return {}
    widgets = cls.SCHEMA.widgets
    if isinstance(values, dict):
        return {w.name: values[w.name] for w in widgets if w.name in values}
    if not isinstance(values, list):
        raise WorkflowError(f"{source}: node {node['id']} ({node['type']}) widgets_values must be a list")
    return _widgets_from_list(widgets, values, node, source)


def _control_layouts(widgets: list[Input]) -> list[frozenset]:
    """Which widgets may have a control value after them in a saved file, most expected first: as
    declared; as an editor that was not told gives one to every INT named seed or noise_seed; none."""
    declared = frozenset(w.name for w in widgets if w.control_after_generate)
    legacy = declared | {w.name for w in widgets if w.seed_named}
    return list(dict.fromkeys((declared, legacy, frozenset())))


def _widgets_from_list(widgets: list[Input], values: list, node: dict, source: str) -> dict:
    """Widget values by name from the editor's ``widgets_values`` list.

    The editor stores a control value ("fixed", "randomize", ...) right after each widget it gave a
    control_after_generate widget, and which ones those are depends on who saved the file: the
    editor follows each input's declaration; an editor that was not told (an older declaration) gave
    one to every INT named seed or noise_seed; a file written by hand, or by this converter before a
    declaration gained a control, may have none. Each of these layouts is read: the one whose values
    all fit their widgets is taken; when several fit, the one that accounts for every value (the
    count); otherwise the file is ambiguous."""
    layouts = _control_layouts(widgets)
    reads = []
    for layout in layouts:
        inputs, fits = _read_layout(widgets, values, layout)
        reads.append((inputs, fits, len(values) == len(widgets) + len(layout)))
    fitting = [r for r in reads if r[1]]
    exact = [r for r in fitting if r[2]]
    if len(exact) == 1:
        return exact[0][0]
    if fitting and all(r[0] == fitting[0][0] for r in fitting):
        return fitting[0][0]
    if not fitting:  # no layout fits: read as counted (or as declared); validation names the bad values
        return next((r[0] for r in reads if r[2]), reads[0][0])
    names = ", ".join(sorted(frozenset().union(*layouts)))
    counts = " or ".join(str(n) for n in sorted({len(widgets) + len(layout) for layout in layouts}))
    raise WorkflowError(f"its {len(values)} widget values can be read with and without a control value (fixed, "
                        f"randomize, ...) after {names}, and the two readings differ",
                        file=None if source == "workflow" else source, node=node["id"], class_type=node["type"],
                        value=values, limit=f"{counts} values", kind="ambiguous_widgets",
                        fix="open the workflow in the editor and save it again (it writes the layout it shows), "
                            "or give widgets_values as an object {input name: value}")


def _widget_slots(widgets: list[Input], count: int, controls: frozenset) -> tuple[list[tuple[int, str]], list[int]]:
    """``(index in widgets_values, input name)`` of each widget a list of ``count`` values holds, in
    the schema's widget order with a control value after each widget named in ``controls``, and the
    indices of those control values."""
    slots, control_at, i = [], [], 0
    for widget in widgets:
        if i >= count:
            break
        slots.append((i, widget.name))
        i += 1
        if widget.name in controls and i < count:
            control_at.append(i)
            i += 1
    return slots, control_at


def _read_layout(widgets: list[Input], values: list, controls: frozenset) -> tuple[dict, bool]:
    """The widget values read with a control value after each widget named in ``controls``, and
    whether every value fits its widget."""
    slots, control_at = _widget_slots(widgets, len(values), controls)
    by_name = {w.name: w for w in widgets}
    fits = (all(_fits(by_name[name], values[i]) for i, name in slots)
            and all(isinstance(values[i], str) and values[i] in CONTROL_VALUES for i in control_at))
    return {name: values[i] for i, name in slots}, fits


def _widget_names_by_index(widgets: list[Input], values: list) -> dict[int, str]:
    """Which input each position of a saved ``widgets_values`` list holds, for naming where a value is:
    the control layout that accounts for every value, else the declared one."""
    layouts = _control_layouts(widgets)
    layout = next((c for c in layouts if len(values) == len(widgets) + len(c)), layouts[0])
    return dict(_widget_slots(widgets, len(values), layout)[0])


def _fits(widget: Input, value) -> bool:
    """Whether a saved value could be this widget's (None: the editor had none to write)."""
    if value is None:
        return True
    if widget.type in ("INT", "FLOAT"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if widget.type == "BOOLEAN":
        return isinstance(value, bool)
    if widget.type == "STRING":
        return isinstance(value, str)
    if callable(widget.options):  # a folder's files: listing them here would read the disk
        return isinstance(value, str)
    return value in widget.option_list()


def _png_workflow(path: Path, locate=None) -> dict:
    """The workflow embedded in a PNG as ComfyUI writes it (tEXt ``prompt`` and ``workflow``)."""
    texts = _png_texts(path)
    ui = loads_strict(texts["workflow"], source=f"{path} (workflow)", locate=locate) if "workflow" in texts else None
    if "prompt" in texts:  # exactly what ran; the UI graph travels along for re-embedding
        prompt = loads_strict(texts["prompt"], source=f"{path} (prompt)", locate=locate)
        return {"prompt": prompt, "extra_data": {"extra_pnginfo": {"workflow": ui}}}
    if isinstance(ui, dict):
        return ui
    raise WorkflowError(f"{path}: this PNG carries no workflow (no tEXt 'prompt' or 'workflow' chunk)")


def _png_texts(path: Path) -> dict[str, str]:
    """The ``prompt`` and ``workflow`` text chunks of a PNG. Streams chunk by chunk, reading only text
    chunks (image data is skipped), so memory and time are bounded by the workflow size limit."""
    try:
        with open_regular(path, "workflow") as (f, state):
            texts = _png_text_chunks(f, path)
            if state_of(f) != state:
                raise changed_while_reading(path, "workflow")
    except FileError as exc:
        raise WorkflowError(exc.message, file=path, value=exc.value, limit=exc.limit, fix=exc.fix,
                            kind=exc.kind) from None
    return texts


def _png_text_chunks(f, path: Path) -> dict[str, str]:
    if read_upto(f, len(_PNG_SIG)) != _PNG_SIG:
        raise WorkflowError(f"{path}: not a PNG file")
    texts: dict[str, str] = {}
    for _ in range(MAX_PNG_CHUNKS):
        head = read_upto(f, 8)
        if len(head) < 8:
            return texts  # no IEND: a truncated PNG still carries the text chunks read so far
        length, ctype = struct.unpack(">I4s", head)
        if not ctype.isalpha():
            raise WorkflowError(f"{path}: chunk type {ctype!r} is not 4 letters: the PNG is damaged")
        if ctype == b"IEND":
            return texts
        if ctype not in (b"tEXt", b"iTXt"):
            f.seek(length + 4, os.SEEK_CUR)  # the body and its CRC
            continue
        body = read_upto(f, min(length, _MAX_KEYWORD_BYTES + 1))
        key = body.partition(b"\0")[0].decode("latin-1")
        if key not in _PNG_KEYS:
            f.seek(length - len(body) + 4, os.SEEK_CUR)
            continue
        if key in texts:
            raise WorkflowError(f"{path}: the PNG holds two '{key}' chunks; ComfyUI writes one, and which one "
                                "is meant is unknown, so neither is used", value=key, kind="duplicate_chunk",
                                fix="save the workflow again from the editor (or as a .json file)")
        if length > MAX_WORKFLOW_BYTES + _MAX_KEYWORD_BYTES:
            raise WorkflowError(f"{path}: the '{key}' chunk is {length} bytes, above the limit of "
                                f"{MAX_WORKFLOW_BYTES} bytes", value=length, limit=MAX_WORKFLOW_BYTES)
        body += read_upto(f, length - len(body))
        f.seek(4, os.SEEK_CUR)
        if len(body) < length:
            raise WorkflowError(f"{path}: the '{key}' chunk is cut short: the PNG is truncated")
        texts[key] = _png_text(ctype, body, path, key)
    raise WorkflowError(f"{path}: more than {MAX_PNG_CHUNKS} chunks before IEND: not an image this reads",
                        limit=MAX_PNG_CHUNKS)


def _png_text(ctype: bytes, body: bytes, path: Path, key: str) -> str:
    """The text of a tEXt (latin-1) or iTXt (UTF-8, maybe zlib-compressed) chunk body.

    iTXt (PNG spec 11.3.4.5): keyword NUL, compression flag (0 or 1), compression method (0: zlib),
    language tag NUL, translated keyword NUL, text; each part is checked, not assumed."""
    rest = body.partition(b"\0")[2]
    if ctype == b"tEXt":
        return rest.decode("latin-1")
    damaged = f"{path}: the iTXt '{key}' chunk is damaged"
    if len(rest) < 2 or rest[0] not in (0, 1) or rest[1] != 0:
        raise WorkflowError(f"{damaged}: its compression flag and method are {list(rest[:2])}, not [0 or 1, 0]",
                            value=list(rest[:2]), limit=[1, 0], kind="damaged_png")
    parts = rest[2:].split(b"\0", 2)
    if len(parts) < 3:
        raise WorkflowError(f"{damaged}: the language tag and translated keyword must each end in a NUL byte",
                            kind="damaged_png")
    text = parts[2]
    try:
        if rest[0] == 1:
            text = _inflate(text, path, key)
        return text.decode("utf-8")
    except (zlib.error, UnicodeDecodeError) as exc:
        raise WorkflowError(f"{path}: the iTXt '{key}' chunk cannot be read: {exc}") from None


_INFLATE_SLICE = 2**20


def _inflate(data: bytes, path: Path, key: str) -> bytearray:
    """zlib ``data`` inflated a slice at a time, refused as soon as it passes the workflow limit: a
    small chunk may inflate to gigabytes, and one ``decompress(data, limit)`` call would still grow
    its buffer to twice the limit."""
    inflater = zlib.decompressobj()
    text = bytearray()
    while not inflater.eof:
        out = inflater.decompress(data, _INFLATE_SLICE)
        data = inflater.unconsumed_tail
        if not out and not data:
            break  # all input used and no end of stream
        text += out
        if len(text) > MAX_WORKFLOW_BYTES:
            raise WorkflowError(f"{path}: the '{key}' chunk inflates to more than {MAX_WORKFLOW_BYTES} bytes",
                                value=len(text), limit=MAX_WORKFLOW_BYTES, kind="too_large")
    if not inflater.eof:
        raise WorkflowError(f"{path}: the iTXt '{key}' chunk is damaged: its compressed text is cut short",
                            kind="damaged_png")
    return text


def api_to_ui(prompt: dict, registry: NodeRegistry) -> dict:
    """An editor graph in the 1.0 schema (object links, ``state``; the shipped editor loads it) for an
    API-format prompt, laid out in columns by depth, so API workflows open in ComfyUI's editor.
    ``ui_to_api`` of the result gives the prompt back."""
    prompt = check_api(prompt)
    ids = {nid: (int(nid) if nid.isdigit() else None) for nid in prompt}
    next_id = max([i for i in ids.values() if i is not None] + [0]) + 1
    for nid in sorted(n for n, i in ids.items() if i is None):
        ids[nid], next_id = next_id, next_id + 1
    depth: dict[str, int] = {}
    pending = sorted(prompt, key=_id_sort)
    for _ in range(len(prompt) + 1):  # longest-path depth without recursion
        changed = False
        for nid in pending:
            ups = [str(v[0]) for v in prompt[nid]["inputs"].values() if is_link(v) and str(v[0]) in prompt]
            d = 1 + max((depth.get(u, 0) for u in ups), default=-1)
            if depth.get(nid) != d:
                depth[nid], changed = d, True
        if not changed:
            break
    rows: dict[int, int] = {}
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for order, nid in enumerate(sorted(prompt, key=lambda n: (depth[n], _id_sort(n)))):
        entry = prompt[nid]
        cls = registry.get(entry["class_type"])
        inputs, widgets = [], []
        schema_inputs = cls.SCHEMA.ordered_inputs() if cls else []
        for inp in schema_inputs:
            value = entry["inputs"].get(inp.name, inp.default if inp.has_default else None)
            if is_link(value):
                link_id = len(links) + 1
                src = str(value[0])
                links.append({"id": link_id, "origin_id": ids.get(src, src), "origin_slot": value[1],
                              "target_id": ids[nid], "target_slot": len(inputs), "type": inp.type})
                out_links.setdefault((src, value[1]), []).append(link_id)
                socket = {"name": inp.name, "type": inp.type, "link": link_id}
                if inp.is_widget:
                    socket["widget"] = {"name": inp.name}
                inputs.append(socket)
                value = inp.default if inp.has_default else None
            if inp.is_widget:
                widgets.append(value)
                if inp.control_after_generate:
                    widgets.append("fixed")
        row = rows.get(depth[nid], 0)
        rows[depth[nid]] = row + 1
        node = {"id": ids[nid], "type": entry["class_type"], "pos": [50 + 420 * depth[nid], 50 + 300 * row],
                "size": [380, 60 + 26 * (len(widgets) + len(inputs))], "flags": {}, "order": order, "mode": 0,
                "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": entry["class_type"]},
                "widgets_values": widgets}
        if isinstance(entry.get("_meta"), dict) and isinstance(entry["_meta"].get("title"), str):
            node["title"] = entry["_meta"]["title"]
        nodes.append((nid, node, cls))
    for nid, node, cls in nodes:
        outs = cls.SCHEMA.outputs if cls else []
        node["outputs"] = [{"name": o.name or o.type, "type": o.type, "links": out_links.get((nid, i)) or None,
                            "slot_index": i} for i, o in enumerate(outs)]
    # A graph id the editor keeps (it makes one up for a file without): derived from the prompt, so
    # converting the same prompt twice writes the same file.
    graph_id = uuid.uuid5(uuid.NAMESPACE_URL, "loraloom:" + json.dumps(prompt, sort_keys=True, default=str))
    return {"id": str(graph_id), "revision": 0, "version": 1,
            "state": {"lastNodeId": max(ids.values(), default=0), "lastLinkId": len(links), "lastGroupId": 0,
                      "lastRerouteId": 0},
            "nodes": [n for _, n, _ in nodes], "links": links, "groups": [], "reroutes": [], "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}}
