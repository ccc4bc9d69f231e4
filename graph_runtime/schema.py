"""Declarative node schema: one declaration gives validation, ComfyUI's V1 class attributes and
ComfyUI's ``/object_info`` JSON.

A node is a class with an ``execute`` method, decorated with :func:`node`::

    @node(id="LoraLoomLoadLoRA", aliases=("LoadLoRA",), category="loraloom/lora",
          display_name="Loom Load LoRA",
          inputs=[Combo("lora_name", options=list_loras, file_kind="loras")],
          outputs=[Output("LORA_WEIGHTS", "lora")])
    class LoadLoRA:
        def execute(self, lora_name): ...

The decorator checks the declaration against ``execute`` at import time and fails with a message
saying what and where. ``aliases`` are older ids of the same node: a workflow saved with one still
loads and runs as the node itself (same validation, same cache key); ComfyUI and ``/object_info`` list
each as a deprecated node, so the editor opens such workflows but offers only the id.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable

from .errors import LoomError, SchemaError

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
_SOCKET_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_ID_RE = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_INPUT_RE = re.compile(r"^[a-z][a-z0-9_]*$")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# ComfyUI's frontend gives an INT input with one of these names a "control after generate" widget
# unless its spec says ``control_after_generate: false`` (a legacy convention of its widget code).
SEED_NAMES = ("seed", "noise_seed")
# The mode a control widget starts at, when it is not the editor's "randomize". The spec's own
# ``control_after_generate`` stays a boolean: ComfyUI 0.3.64's frontend (1.27) accepts nothing else
# there and starts every control widget at "randomize"; the pack's editor extension (web/) reads
# this key and sets the mode on each node placed fresh (a loaded workflow keeps its saved mode).
CONTROL_START_KEY = "loraloom_control_after_generate"
COMFY_SOCKETS = ("MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "CLIP_VISION", "CONTROL_NET")
"""ComfyUI's own value types: our runtime never makes or takes such values, so only a comfy-only node
(`NodeSchema.comfy_only`) may have sockets of these types."""
_MISSING = object()


@dataclass(frozen=True)
class Input:
    """One input of a node: a widget (INT, FLOAT, STRING, BOOLEAN, COMBO) or a link socket type.

    ``options`` (COMBO) is a sequence or a callable returning one (e.g. the files in a folder).
    ``file_kind`` marks a value that names a file under a configured root (``"loras"``,
    ``"models"``): its content fingerprint joins the cache key. ``control_after_generate`` gives
    the widget the editor's control widget (what happens to the value after each run): True starts
    it at "randomize", a mode name (``CONTROL_VALUES``) at that mode.
    """

    name: str
    type: str
    default: Any = _MISSING
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: Any = None
    multiline: bool = False
    tooltip: str = ""
    optional: bool = False
    file_kind: str | None = None
    control_after_generate: bool | str = False
    lazy: bool = False
    """A link whose value the node does not take: the executor runs nothing upstream of it for this
    node, and passes the link itself (``[node id, slot]``); the node may run that part of the graph
    itself (a SweepGrid runs it once per cell). Its upstream still joins the node's cache key."""

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING

    @property
    def seed_named(self) -> bool:
        """Whether the editor adds a control widget to this input when its spec does not say."""
        return self.type == "INT" and self.name in SEED_NAMES

    def option_list(self) -> list:
        """The current COMBO options (callables are asked each time: folders change)."""
        opts = self.options() if callable(self.options) else self.options
        return list(opts or [])

    def comfy_spec(self) -> tuple:
        """This input as ComfyUI's V1 ``INPUT_TYPES`` entry."""
        opts: dict[str, Any] = {}
        if self.has_default:
            opts["default"] = self.default
        for key in ("min", "max", "step"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        if self.type == "STRING":
            opts["multiline"] = self.multiline
        if self.control_after_generate or self.seed_named:
            # Always said for a seed-named INT: the editor would add a control widget when unsaid.
            opts["control_after_generate"] = bool(self.control_after_generate)
            if isinstance(self.control_after_generate, str):
                opts[CONTROL_START_KEY] = self.control_after_generate
        if self.tooltip:
            opts["tooltip"] = self.tooltip
        if self.lazy:
            opts["lazy"] = True
        if self.type == "COMBO":
            return (self.option_list(), opts)
        return (self.type, opts) if opts else (self.type,)


def Int(name: str, default: int = 0, *, min: int | None = None, max: int | None = None, step: int = 1,
        tooltip: str = "", optional: bool = False, control_after_generate: bool | str | None = None) -> Input:
    """An INT widget. Inputs named ``seed`` or ``noise_seed`` get the editor's control_after_generate
    widget (fixed / increment / decrement / randomize after each run) unless it is set to False; a
    mode name sets the mode it starts at (the editor's own start is "randomize")."""
    if control_after_generate is None:
        control_after_generate = name in SEED_NAMES
    return Input(name, "INT", default, min, max, step, tooltip=tooltip, optional=optional,
                 control_after_generate=control_after_generate)


def Float(name: str, default: float = 0.0, *, min: float | None = None, max: float | None = None,
          step: float = 0.01, tooltip: str = "", optional: bool = False) -> Input:
    """A FLOAT widget."""
    return Input(name, "FLOAT", default, min, max, step, tooltip=tooltip, optional=optional)


def String(name: str, default: str = "", *, multiline: bool = False, tooltip: str = "",
           optional: bool = False, file_kind: str | None = None) -> Input:
    """A STRING widget."""
    return Input(name, "STRING", default, multiline=multiline, tooltip=tooltip, optional=optional,
                 file_kind=file_kind)


def Boolean(name: str, default: bool = False, *, tooltip: str = "", optional: bool = False) -> Input:
    """A BOOLEAN widget."""
    return Input(name, "BOOLEAN", default, tooltip=tooltip, optional=optional)


def Combo(name: str, options: Iterable | Callable[[], Iterable], default: Any = _MISSING, *,
          tooltip: str = "", optional: bool = False, file_kind: str | None = None) -> Input:
    """A COMBO widget choosing one of ``options`` (a list, or a callable listing them)."""
    return Input(name, "COMBO", default, options=options if callable(options) else tuple(options),
                 tooltip=tooltip, optional=optional, file_kind=file_kind)


def Link(name: str, type: str, *, tooltip: str = "", optional: bool = False, lazy: bool = False) -> Input:
    """An input fed by another node's output of socket type ``type`` (UPPER_SNAKE); ``lazy``: see
    `Input.lazy`."""
    return Input(name, type, tooltip=tooltip, optional=optional, lazy=lazy)


@dataclass(frozen=True)
class Output:
    """One output socket: its type and name."""

    type: str
    name: str = ""
    tooltip: str = ""


@dataclass(frozen=True)
class NodeSchema:
    """Everything the runtime, ComfyUI and the editor need to know about a node class."""

    id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]
    output_node: bool = False
    not_idempotent: bool = False
    comfy_export: bool = True
    comfy_only: bool = False
    """A node that runs only inside ComfyUI (it takes or makes ComfyUI's own values, `COMFY_SOCKETS`):
    listed in ComfyUI's mappings, never in the headless registry (runtime, CLI, server)."""
    version: int = 1
    aliases: tuple[str, ...] = ()
    """Older ids of this node, still accepted wherever an id is (see :func:`node`)."""
    python_module: str = "custom_nodes.loraloom"
    fingerprint: Callable[[dict, Any], str | None] | None = field(default=None, compare=False)
    persist: Any = field(default=None, compare=False)
    """A codec (:class:`.diskcache.Codec`) when the node's results are kept in the disk cache too."""

    @cached_property
    def lazy_inputs(self) -> frozenset[str]:
        """The inputs whose links the executor leaves unevaluated for this node (`Input.lazy`)."""
        return frozenset(inp.name for inp in self.inputs if inp.lazy)

    def input(self, name: str) -> Input | None:
        for inp in self.inputs:
            if inp.name == name:
                return inp
        return None

    @property
    def widgets(self) -> list[Input]:
        """Widget inputs in the editor's order (required first, then optional)."""
        return [i for i in self.ordered_inputs() if i.is_widget]

    def ordered_inputs(self) -> list[Input]:
        """Inputs in ComfyUI's order: required first, then optional (the editor's widget order)."""
        return [i for i in self.inputs if not i.optional] + [i for i in self.inputs if i.optional]

    def input_types(self) -> dict:
        """ComfyUI's ``INPUT_TYPES()`` dict."""
        out: dict[str, dict] = {"required": {}}
        for inp in self.ordered_inputs():
            out.setdefault("optional" if inp.optional else "required", {})[inp.name] = inp.comfy_spec()
        return out

    def object_info(self) -> dict:
        """This node in the shape of ComfyUI's ``/object_info`` JSON."""
        ordered = self.ordered_inputs()
        return {
            "input": self.input_types(),
            "input_order": {
                "required": [i.name for i in ordered if not i.optional],
                **({"optional": [i.name for i in ordered if i.optional]}
                   if any(i.optional for i in ordered) else {}),
            },
            "output": [o.type for o in self.outputs],
            "output_is_list": [False] * len(self.outputs),
            "output_name": [o.name or o.type for o in self.outputs],
            "output_tooltips": [o.tooltip for o in self.outputs],
            "name": self.id,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }

    def alias_display_name(self, alias: str) -> str:
        """What the editor shows for a node placed under the older id ``alias``."""
        return f"{self.display_name} [old id {alias}]"


def _check_schema(schema: NodeSchema, execute: Callable, where: str) -> None:
    """Raise SchemaError for a declaration that contradicts itself or its execute function."""
    problems = []
    if not _ID_RE.match(schema.id):
        problems.append(f"node id {schema.id!r} is not PascalCase")
    for alias in schema.aliases:
        if not isinstance(alias, str) or not _ID_RE.match(alias):
            problems.append(f"alias {alias!r} is not a PascalCase id")
        elif alias == schema.id:
            problems.append(f"alias {alias!r} is the node's own id")
    if len(set(schema.aliases)) != len(schema.aliases):
        problems.append(f"aliases {list(schema.aliases)} name one id twice")
    seen = set()
    for inp in schema.inputs:
        if inp.name in seen:
            problems.append(f"input '{inp.name}' is declared twice")
        seen.add(inp.name)
        if not _INPUT_RE.match(inp.name):
            problems.append(f"input '{inp.name}' is not snake_case")
        if not inp.is_widget and not _SOCKET_RE.match(inp.type):
            problems.append(f"input '{inp.name}' type {inp.type!r} is neither a widget type "
                            f"{WIDGET_TYPES} nor an UPPER_SNAKE socket type")
        problems.extend(_check_widget(inp))
    for i, out in enumerate(schema.outputs):
        if not _SOCKET_RE.match(out.type):
            problems.append(f"output {i} type {out.type!r} is not an UPPER_SNAKE socket type")
    comfy_types = sorted({s.type for s in (*schema.inputs, *schema.outputs) if s.type in COMFY_SOCKETS})
    if comfy_types and not schema.comfy_only:
        problems.append(f"socket type(s) {', '.join(comfy_types)} are ComfyUI's own values, which only a node "
                        "declared with comfy_only=True may take or make")
    if not schema.outputs and not schema.output_node:
        problems.append("a node with no outputs must be an output node (output_node=True)")
    if schema.persist is not None and (schema.not_idempotent or not schema.outputs):
        problems.append("persist (the disk cache) is for pure nodes with outputs: not with not_idempotent=True "
                        "or without outputs")

    params = inspect.signature(execute).parameters
    names = [p for p in params if p != "self"]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for inp in schema.inputs:
        if inp.name not in params and not var_kw:
            problems.append(f"input '{inp.name}' is not a parameter of execute{inspect.signature(execute)}")
    for name in names:
        p = params[name]
        if p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        inp = schema.input(name)
        if inp is None:
            if p.default is inspect.Parameter.empty:
                problems.append(f"execute parameter '{name}' has no declared input")
        elif inp.optional and p.default is inspect.Parameter.empty:
            problems.append(f"optional input '{name}' needs a default in execute()")
    if problems:
        raise SchemaError(f"node {schema.id} ({where}): " + "; ".join(problems))


def _check_widget(inp: Input) -> list[str]:
    problems = []
    control = inp.control_after_generate
    if not isinstance(control, bool) and control not in CONTROL_VALUES:
        problems.append(f"input '{inp.name}' control_after_generate {control!r} is neither a bool nor one of "
                        f"{CONTROL_VALUES}")
    if inp.type in ("INT", "FLOAT"):
        for key in ("default", "min", "max", "step"):
            value = getattr(inp, key)
            if key == "default" and not inp.has_default:
                continue
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                problems.append(f"input '{inp.name}' {key} {value!r} is not a finite number")
                return problems
        if inp.min is not None and inp.max is not None and inp.min > inp.max:
            problems.append(f"input '{inp.name}' min {inp.min} is above max {inp.max}")
        if inp.has_default and inp.min is not None and inp.default < inp.min:
            problems.append(f"input '{inp.name}' default {inp.default} is below min {inp.min}")
        if inp.has_default and inp.max is not None and inp.default > inp.max:
            problems.append(f"input '{inp.name}' default {inp.default} is above max {inp.max}")
        if inp.type == "INT" and inp.has_default and not isinstance(inp.default, int):
            problems.append(f"input '{inp.name}' default {inp.default!r} is not an int")
    elif inp.type == "COMBO":
        if not callable(inp.options):
            opts = list(inp.options or ())
            if not opts:
                problems.append(f"input '{inp.name}' COMBO has no options")
            elif inp.has_default and inp.default not in opts:
                problems.append(f"input '{inp.name}' default {inp.default!r} is not one of {opts}")
    elif inp.type == "BOOLEAN" and inp.has_default and not isinstance(inp.default, bool):
        problems.append(f"input '{inp.name}' default {inp.default!r} is not a bool")
    elif inp.type == "STRING" and inp.has_default and not isinstance(inp.default, str):
        problems.append(f"input '{inp.name}' default {inp.default!r} is not a str")
    return problems


def node(*, inputs: Iterable[Input] = (), outputs: Iterable[Output] = (), category: str,
         display_name: str | None = None, description: str | None = None, id: str | None = None,
         output_node: bool = False, not_idempotent: bool = False, version: int = 1,
         fingerprint: Callable[[dict, Any], str | None] | None = None, comfy_export: bool = True,
         comfy_only: bool = False, persist=None, aliases: Iterable[str] = ()):
    """Class decorator declaring a node. Checks the declaration and adds ComfyUI's V1 attributes.

    ``aliases``: older ids of this node (e.g. the id it had before it was renamed), accepted wherever
    the id is, with the same cache key; listed as deprecated in ComfyUI and ``/object_info``.
    ``version`` joins the cache key: bump it when the node's results change for the same inputs.
    ``fingerprint(inputs, folders)`` may return a string that joins the cache key (content the
    inputs refer to); inputs with ``file_kind`` are fingerprinted without it.
    ``comfy_export=False`` keeps a node out of ComfyUI's mappings (e.g. our stand-ins for ComfyUI's
    own SaveImage/PreviewImage, which ComfyUI would drop anyway).
    ``comfy_only=True``: the node runs only inside ComfyUI, on ComfyUI's own values (its sockets may
    have the types in `COMFY_SOCKETS`): the headless registry refuses it, ComfyUI's mappings list it.
    ``persist``: a codec (:class:`.diskcache.Codec`) that writes the node's outputs to a file and reads
    them back: its results are then also kept in the disk cache, across processes. Only for pure,
    expensive nodes (a merge), whose outputs the codec stores exactly.

    A class may define ``check_inputs(cls, constants) -> {input_name: problem}`` (a classmethod) for
    rules the widget specs cannot say (e.g. "a multiple of 8"); it runs during validation, beside the
    widget checks, on the constant inputs that passed them: a linked input, or one refused by its own
    spec, is absent from ``constants``, and a rule over it should then say nothing. A problem
    is a message, or better one of our errors (``InputError(message, value=..., limit=..., fix=...)``),
    whose fields then reach the validation error's ``extra_info``. Rules that depend on what feeds a
    link (which architecture a model is) go in ``output_facts`` / ``check_upstream``, which
    validation runs in dependency order (see graph._check_upstream).
    """

    def wrap(cls):
        execute = getattr(cls, "execute", None)
        where = f"{cls.__module__}.{cls.__qualname__}"
        if not callable(execute):
            raise SchemaError(f"node class {where} has no execute() method")
        if isinstance(aliases, str):
            raise SchemaError(f"node class {where}: aliases={aliases!r} is one string, not a tuple of ids.",
                              value=aliases, kind="alias_string", fix=f"write aliases=({aliases!r},)")
        schema = NodeSchema(
            id=id or cls.__name__,
            display_name=display_name or cls.__name__,
            category=category,
            description=description if description is not None else inspect.cleandoc(cls.__doc__ or ""),
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            output_node=output_node,
            not_idempotent=not_idempotent,
            version=version,
            aliases=tuple(aliases),
            python_module=_comfy_module(cls.__module__),
            fingerprint=fingerprint,
            comfy_export=comfy_export,
            comfy_only=comfy_only,
            persist=persist,
        )
        _check_schema(schema, execute, where)
        cls.SCHEMA = schema
        cls.INPUT_TYPES = classmethod(lambda c: c.SCHEMA.input_types())
        cls.RETURN_TYPES = tuple(o.type for o in schema.outputs)
        cls.RETURN_NAMES = tuple(o.name or o.type for o in schema.outputs)
        cls.OUTPUT_TOOLTIPS = tuple(o.tooltip for o in schema.outputs)
        cls.FUNCTION = "execute"
        cls.CATEGORY = schema.category
        cls.OUTPUT_NODE = schema.output_node
        cls.DESCRIPTION = schema.description
        cls.IS_CHANGED = classmethod(_is_changed)
        return cls

    return wrap


def _is_changed(cls, **inputs):
    """ComfyUI's change check: NaN (always run) for not-idempotent nodes, else the file fingerprints."""
    if cls.SCHEMA.not_idempotent:
        return float("nan")
    from .context import current_context  # late: context imports this module

    folders = current_context().folders
    return input_fingerprint(cls.SCHEMA, inputs, folders) or ""


def input_fingerprint(schema: NodeSchema, inputs: dict, folders) -> str | None:
    """Content fingerprint of the files a node's inputs name (None when they name none)."""
    from .cache import file_fingerprint

    parts = []
    for inp in schema.inputs:
        value = inputs.get(inp.name)
        if inp.file_kind and isinstance(value, str) and value:
            try:
                parts.append(f"{inp.name}={file_fingerprint(folders.find(inp.file_kind, value))}")
            except LoomError as exc:
                raise exc.at(input=inp.name) from None
    if schema.fingerprint is not None:
        extra = schema.fingerprint(inputs, folders)
        if extra is not None:
            parts.append(str(extra))
    return "|".join(parts) if parts else None


def _comfy_module(module: str) -> str:
    """``loraloom.nodes.blend`` -> ``custom_nodes.loraloom`` (what ComfyUI reports for pack nodes)."""
    top = module.split(".")[0]
    return f"custom_nodes.{top}"


class NodeRegistry:
    """Node classes by id. The runtime asks it; users add their own classes with :meth:`register`.

    A node's aliases (older ids) resolve to its class everywhere an id is asked for (:meth:`get`,
    ``in``); iteration gives the ids only."""

    def __init__(self, classes: Iterable[type] = (), *, comfy: bool = False):
        self._classes: dict[str, type] = {}
        self._aliases: dict[str, str] = {}
        self.comfy = comfy
        for cls in classes:
            self.register(cls)

    def register(self, cls: type, *, replace: bool = False) -> type:
        """Add a node class declared with :func:`node`. Usable as a decorator.

        An id or alias already taken by another class is a SchemaError naming both (``replace=True``
        lets a class take the place of the one registered under its id). A comfy-only node
        (`NodeSchema.comfy_only`) only joins a registry made with ``comfy=True`` (one that checks
        prompts inside ComfyUI): our runtime cannot make the ComfyUI values it takes."""
        schema = getattr(cls, "SCHEMA", None)
        if not isinstance(schema, NodeSchema):
            raise SchemaError(f"{cls!r} is not a node class: decorate it with @node(...) first")
        if schema.comfy_only and not self.comfy:
            raise SchemaError(f"node {schema.id} is comfy_only: it runs only inside ComfyUI, on ComfyUI's own "
                              "values, so the headless runtime cannot hold it; ComfyUI lists it from the pack")
        old = self._classes.get(schema.id)
        if old is not None and old is not cls and not replace:
            raise SchemaError(f"node id {schema.id!r} is already registered by "
                              f"{old.__module__}; pick another id or pass replace=True")
        for name in (schema.id, *schema.aliases):
            owner = self.canonical(name)
            if owner is not None and owner != schema.id:
                what = "id" if name == schema.id else "alias"
                taken = "the id" if owner == name else "an alias"
                raise SchemaError(f"node {schema.id} ({cls.__module__}): its {what} {name!r} is already {taken} of "
                                  f"node {owner} ({self._classes[owner].__module__}).", key=name, value=name,
                                  kind="node_id_taken", fix=f"pick another {what}")
        if old is not None:
            self._aliases = {a: cid for a, cid in self._aliases.items() if cid != schema.id}
        self._classes[schema.id] = cls
        self._aliases.update(dict.fromkeys(schema.aliases, schema.id))
        return cls

    def canonical(self, class_type: str) -> str | None:
        """The id ``class_type`` names (itself, or the id it is an alias of); None when unknown."""
        if not isinstance(class_type, str):  # a workflow from a stranger may hold any JSON value here
            return None
        return class_type if class_type in self._classes else self._aliases.get(class_type)

    def get(self, class_type: str) -> type | None:
        """The class of the node ``class_type`` names (an id or an alias); None when unknown."""
        cid = self.canonical(class_type)
        return None if cid is None else self._classes[cid]

    def __contains__(self, class_type: str) -> bool:
        return self.canonical(class_type) is not None

    def __iter__(self):
        return iter(sorted(self._classes))

    def __len__(self) -> int:
        return len(self._classes)

    def aliases(self) -> dict[str, str]:
        """Every alias and the id it names."""
        return dict(sorted(self._aliases.items()))

    def copy(self) -> "NodeRegistry":
        new = NodeRegistry(comfy=self.comfy)
        new._classes = dict(self._classes)
        new._aliases = dict(self._aliases)
        return new

    def object_info(self) -> dict:
        """All nodes, as ComfyUI's ``GET /object_info`` answers; each alias as a deprecated node."""
        info = {cid: self._classes[cid].SCHEMA.object_info() for cid in self}
        # ComfyUI's "deprecated": its frontend loads such a node in a saved workflow but leaves it out of
        # the node search (unless the user's "show deprecated" setting is on).
        info.update({alias: {**info[cid], "name": alias, "deprecated": True,
                             "display_name": self._classes[cid].SCHEMA.alias_display_name(alias)}
                     for alias, cid in self.aliases().items()})
        return dict(sorted(info.items()))

    def comfy_mappings(self) -> tuple[dict, dict]:
        """``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS`` for ComfyUI, aliases included as
        deprecated classes (:func:`comfy_classes`)."""
        classes = {}
        for cid in self:
            if self._classes[cid].SCHEMA.comfy_export:
                classes.update(comfy_classes(self._classes[cid]))
        return classes, comfy_display_names(classes)


def comfy_classes(cls: type) -> dict[str, type]:
    """ComfyUI's V1 mapping entries of node class ``cls``: its id, and each alias as a deprecated
    subclass (ComfyUI's ``DEPRECATED``: workflows saved with the old id open and run; the node search
    leaves it out) whose ``ALIAS`` names the id it is placed under."""
    schema = cls.SCHEMA
    return {schema.id: cls, **{alias: _deprecated_class(cls, alias) for alias in schema.aliases}}


def comfy_display_names(classes: dict[str, type]) -> dict[str, str]:
    """``NODE_DISPLAY_NAME_MAPPINGS`` for the mapping entries ``classes`` (from :func:`comfy_classes`)."""
    return {name: cls.SCHEMA.display_name if name == cls.SCHEMA.id else cls.SCHEMA.alias_display_name(name)
            for name, cls in classes.items()}


@functools.cache
def _deprecated_class(cls: type, alias: str) -> type:
    # One class per (class, alias): ComfyUI's caches and our queue checks key on the class object.
    return type(f"{alias}Deprecated", (cls,), {
        "DEPRECATED": True, "ALIAS": alias, "__module__": cls.__module__,
        "__doc__": f"{cls.SCHEMA.id} under its old id {alias} (deprecated): {cls.__doc__ or ''}".strip()})
