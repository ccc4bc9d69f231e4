"""A sweep's definition (`SweepSpec`: axes of ``NODE_ID.INPUT = [values]``, zipped axes, seeds) and its
plan (`plan`: every cell's prompt, validated up front, and the order that reuses the most).

Axes: the first is X (the grid's columns), the second Y (its rows), every further one Z (one grid per
combination). Cells are numbered row-major: X fastest, then Y, then the Z axes in order. A zipped axis
moves several inputs together (its i-th position sets each target's i-th value); ``seeds`` is an axis
over every seed input of the workflow (each Sample's ``seed``), last of all.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..graph_runtime import LoomError, Runtime, ValidationError, WorkflowError
from ..graph_runtime.graph import ValidPrompt, validate_prompt
from ..graph_runtime.jsonio import loads_strict
from ..graph_runtime.workflow import SEED_AXIS, apply_overrides, is_link, parse_axis, parse_seeds
from ..graph_runtime.workflow import axis_error as _axis_error
from ..nodes.common import IMAGE, LORA, MODEL
from .cell import REPORT_NODES, Cell, image_sources

# The wires that carry model state (a base, LoRAs, blends, merges, fuses): the keys of what a sampler
# takes on them decide what the model pool must patch, so cells equal there share one patched state.
STATE_TYPES = (MODEL, LORA)


@dataclass(frozen=True)
class Axis:
    """One axis: ``targets`` (``"NODE_ID.INPUT"``, several for a zipped axis) and ``values``, one tuple
    per position holding each target's value. ``name`` labels it on the grid (default: the targets)."""

    targets: tuple[str, ...]
    values: tuple[tuple, ...]
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or " + ".join(self.targets)

    def value_label(self, position: int) -> str:
        """The text of one position on the grid: ``0.5``, or ``0.5, 1`` for a zipped axis."""
        return ", ".join(_show(v) for v in self.values[position])

    def overrides(self, position: int) -> dict[str, Any]:
        return dict(zip(self.targets, self.values[position]))

    def to_json(self) -> dict:
        return {"name": self.label, "targets": list(self.targets), "values": [list(v) for v in self.values]}

    @classmethod
    def from_json(cls, data: Mapping) -> "Axis":
        return cls(tuple(data["targets"]), tuple(tuple(v) for v in data["values"]), data.get("name", ""))


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class SweepSpec:
    """The axes of a sweep, typed by the workflow's node schema (see `build_spec`). JSON-serialisable:
    the grid PNG embeds it and ``sweep.json`` holds it."""

    axes: tuple[Axis, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(axis.values) for axis in self.axes)

    def coords(self) -> list[tuple[int, ...]]:
        """Every cell's coordinates (one position per axis), row-major: X fastest, then Y, then Z."""
        return [tuple(reversed(c)) for c in itertools.product(*(range(n) for n in reversed(self.shape)))]

    def overrides(self, coords: tuple[int, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for axis, position in zip(self.axes, coords):
            out.update(axis.overrides(position))
        return out

    def to_json(self) -> dict:
        return {"axes": [axis.to_json() for axis in self.axes]}

    @classmethod
    def from_json(cls, data: Mapping) -> "SweepSpec":
        return cls(tuple(Axis.from_json(a) for a in data["axes"]))


def typed(inp, value: Any) -> Any:
    """A value given as text typed as the input's widget reads it (``"0.5"`` for a FLOAT is 0.5,
    ``"true"`` for a BOOLEAN is True). Text that does not read as that type stays text: validation then
    reports it with the cell it is in, beside every other cell's problems."""
    if not isinstance(value, str) or inp is None:
        return value
    try:
        if inp.type == "INT":
            return int(value.replace("_", ""))
        if inp.type == "FLOAT":
            return float(loads_strict(value, source="axis value")) if value else value
        if inp.type == "BOOLEAN" and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if inp.type == "COMBO":
            # options that are not text (numbers) are matched by their text
            return next((o for o in inp.option_list() if not isinstance(o, str) and str(o) == value), value)
    except (ValueError, LoomError):
        return value
    return value


def _input_of(prompt: dict, registry, target: str):
    """The schema input a target names; an error naming the target when its node or input is unknown."""
    node_id, _, name = target.partition(".")
    if node_id not in prompt:
        ids = ", ".join(sorted(prompt)[:20])
        raise WorkflowError(f"axis {target}: the workflow has no node {node_id} (nodes: {ids})", key=target,
                            value=node_id, kind="override_unknown_node")
    class_type = prompt[node_id]["class_type"]
    cls = registry.get(class_type)
    inp = cls.SCHEMA.input(name) if cls is not None else None
    if cls is not None and (inp is None or not inp.is_widget):
        widgets = ", ".join(i.name for i in cls.SCHEMA.widgets)
        raise _axis_error(f"axis {target}: node {node_id} ({class_type}) has no widget input {name!r} "
                          f"(widgets: {widgets})", target, name)
    if is_link(prompt[node_id]["inputs"].get(name)):
        raise _axis_error(f"axis {target}: input {name!r} of node {node_id} is linked to another node; an axis "
                          "sets values", target, name, fix="sweep a widget input, or the node the link comes from")
    return inp


def _axis(prompt: dict, registry, columns: Mapping[str, list], name: str = "") -> Axis:
    targets = tuple(columns)
    lengths = {len(v) for v in columns.values()}
    if not targets or lengths == {0}:
        raise _axis_error(f"axis {name or targets}: no values", name or None)
    if len(lengths) > 1:
        sizes = ", ".join(f"{t}: {len(v)}" for t, v in columns.items())
        raise _axis_error(f"zipped axis {' + '.join(targets)}: its value lists differ in length ({sizes})",
                          " + ".join(targets), sizes, fix="give every zipped input the same number of values")
    inputs = {t: _input_of(prompt, registry, t) for t in targets}
    read = {t: [typed(inputs[t], v) for v in values] for t, values in columns.items()}
    return Axis(targets, tuple(zip(*(read[t] for t in targets))), name)


def _columns(item) -> dict[str, list]:
    """One axis given as ``"4.weight=0,1"``, ``{"4.weight": [0, 1]}`` (several keys: zipped) or a list of
    such strings (zipped)."""
    if isinstance(item, str):
        return dict([parse_axis(item)])
    if isinstance(item, Mapping):
        # a value list, or one value / "V1,V2" text read as the command line reads it
        return {str(k): list(v) if isinstance(v, (list, tuple)) else parse_axis(f"{k}={v}")[1]
                for k, v in item.items()}
    if isinstance(item, (list, tuple)) and all(isinstance(i, str) for i in item):
        return dict(parse_axis(i) for i in item)
    raise _axis_error(f"axis {item!r}: expected 'NODE_ID.INPUT=V1,V2' or {{'NODE_ID.INPUT': [values]}}", value=item)


def seed_targets(prompt: dict, registry) -> list[str]:
    """The seed inputs of the workflow's samplers (nodes with an IMAGE output), set as values: each
    Sample's ``seed``. Other seeds (a DARE merge's) are the graph's own: an axis names them."""
    out = []
    for nid, node in prompt.items():
        cls = registry.get(node["class_type"])
        if cls is None or all(o.type != IMAGE for o in cls.SCHEMA.outputs):
            continue
        for inp in cls.SCHEMA.widgets:
            if inp.seed_named and not is_link(node["inputs"].get(inp.name)):
                out.append(f"{nid}.{inp.name}")
    return out


def build_spec(prompt: dict, registry, axes=(), zip: Iterable = (), seeds=None) -> SweepSpec:
    """The sweep over ``prompt``: ``axes`` (a dict ``{"4.weight": [0, 0.5]}``, one axis per key, or a
    list of ``"4.weight=0,0.5"`` strings and dicts, a dict of several keys being one zipped axis), then
    ``zip`` (zipped axes, each a dict or a list of strings), then ``seeds`` (a list, or ``"1,2,3"``):
    one axis setting every seed input of the workflow. Values given as text are typed by the schema."""
    for what, given in (("axes", axes), ("zip", zip)):
        if not isinstance(given, (Mapping, list, tuple)) or (what == "zip" and isinstance(given, Mapping)):
            raise _axis_error(f"{what}: expected a list of axes{' or a dict' if what == 'axes' else ''}, not "
                              f"{type(given).__name__}", what, given)
    if seeds is not None and not isinstance(seeds, (str, list, tuple)):
        raise _axis_error(f"seeds: expected a list or '1,2,3', not {type(seeds).__name__}", SEED_AXIS, seeds)
    items = [{k: v} for k, v in axes.items()] if isinstance(axes, Mapping) else list(axes)
    built = [_axis(prompt, registry, _columns(item)) for item in items]
    built += [_axis(prompt, registry, _columns(item)) for item in zip]
    if seeds is not None:
        targets = seed_targets(prompt, registry)
        if not targets:
            raise _axis_error("--seeds: the workflow has no seed input to set", SEED_AXIS,
                              fix="name the input in an axis instead, e.g. --axis 5.seed=1,2")
        values = parse_seeds(seeds) if isinstance(seeds, str) else list(seeds)
        built.append(_axis(prompt, registry, {t: values for t in targets}, SEED_AXIS))
    seen: dict[str, str] = {}
    for axis in built:
        for target in axis.targets:
            if target in seen:
                raise _axis_error(f"{target} is on two axes ({seen[target]} and {axis.label})", target,
                                  fix="zip them into one axis, or drop one")
            seen[target] = axis.label
    if not built:
        raise _axis_error("a sweep needs at least one axis", fix="add --axis NODE_ID.INPUT=V1,V2 or --seeds")
    return SweepSpec(tuple(built))


class SweepValidationError(ValidationError):
    """Cells of a sweep failed validation: every failing cell's problems, each with the cell's index,
    coordinates and overrides (``cells``: a list of ``{"index", "coords", "overrides", "error"}``).
    ``node_errors`` gathers them by node in ComfyUI's shape, each detail prefixed with its cell."""

    kind = "invalid_sweep"

    def __init__(self, failures: list[tuple[Cell, ValidationError]], total: int):
        self.cells = [{"index": cell.index, "coords": list(cell.coords), "overrides": cell.overrides,
                       "error": exc.to_json()} for cell, exc in failures]
        node_errors: dict[str, dict] = {}
        for cell, exc in failures:
            for nid, entry in exc.node_errors.items():
                merged = node_errors.setdefault(nid, {**entry, "errors": []})
                merged["errors"] += [{**err, "details": f"cell {_cell_name(cell)}: {err['details']}"}
                                     for err in entry["errors"]]
        error = {"type": "sweep_cells_failed_validation",
                 "message": f"{len(failures)} of {total} sweep cells failed validation", "details": "",
                 "extra_info": {"cells": [c["index"] for c in self.cells]}}
        self._failures = [(cell, exc) for cell, exc in failures]
        super().__init__(error, node_errors)

    def describe(self) -> str:
        lines = [self.error["message"]]
        for cell, exc in self._failures:
            lines += [f"  cell {_cell_name(cell)}: {line.strip()}" for line in exc.describe().splitlines()[1:]
                      or [exc.describe()]]
        return "\n".join(lines)


def _cell_name(cell: Cell) -> str:
    where = ", ".join(f"{k}={_show(v)}" for k, v in cell.overrides.items())
    return f"{cell.index} {list(cell.coords)} ({where})"


@dataclass
class SweepPlan:
    """A planned sweep: the ``spec``, the workflow's ``prompt`` and editor graph ``ui`` (None when it came
    in API form), its ``source``, the ``cells`` in row-major order (``cells[i].index == i``), and ``order``:
    the cell indices in the order that reuses the most."""

    spec: SweepSpec
    prompt: dict
    ui: dict | None
    source: str
    cells: list[Cell]
    order: list[int] = field(default_factory=list)

    @property
    def digest(self) -> str:
        """A hash of what the sweep computes (the workflow's prompt and the axes): its output folder's name."""
        text = json.dumps({"prompt": self.prompt, "spec": self.spec.to_json()}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def ordered(self) -> list[Cell]:
        return [self.cells[i] for i in self.order]


def _state_keys(valid: ValidPrompt, keys: dict[str, str], registry) -> set[str]:
    """The keys of every node whose output carries model state (`STATE_TYPES`)."""
    return {keys[nid] for nid, node in valid.nodes.items() if nid in keys
            and any(o.type in STATE_TYPES for o in registry.get(node["class_type"]).SCHEMA.outputs)}


def _affinity(valid: ValidPrompt, keys: dict[str, str], registry) -> str:
    """A hash of the keys of what the model state's consumers (samplers, savers) take on their state
    wires: equal exactly when those cells need the same patched model (same base, LoRAs, weights, merges)."""
    fed = set()
    for nid, node in valid.nodes.items():
        schema = registry.get(node["class_type"]).SCHEMA
        if any(o.type in STATE_TYPES for o in schema.outputs):
            continue
        for name, value in node["inputs"].items():
            inp = schema.input(name)
            if inp is not None and inp.type in STATE_TYPES and is_link(value) and value[0] in keys:
                fed.add(keys[value[0]])
    return hashlib.sha256("\n".join(sorted(fed)).encode()).hexdigest()[:16]


def run_order(cells: list[Cell], state: dict[int, set[str]]) -> list[int]:
    """Cell indices: cells of one affinity next to each other (in row-major order among themselves), and
    each next group the one sharing the most model-state keys with the group before, then the most input
    values (so a weight grid runs as a snake, one value changing at a time; ties: the earlier group):
    what changes from one group to the next is as little as the grid allows."""
    groups: dict[str, list[int]] = {}
    for cell in cells:
        groups.setdefault(cell.affinity, []).append(cell.index)
    first = {a: next(c for c in cells if c.index == members[0]) for a, members in groups.items()}
    position = {a: n for n, a in enumerate(groups)}
    left = set(groups)
    order: list[int] = []
    keys: set[str] = set()
    values: dict = {}
    while left:
        def closeness(a):
            same = sum(1 for k, v in first[a].overrides.items() if k in values and values[k] == v)
            return len(state.get(groups[a][0], set()) & keys), same, -position[a]

        best = max(left, key=closeness)
        left.remove(best)
        order += groups[best]
        keys, values = state.get(groups[best][0], set()), first[best].overrides
    return order


def plan(runtime: Runtime, workflow, spec: SweepSpec | None = None, **axes) -> SweepPlan:
    """Plan a sweep of ``workflow`` on ``runtime``: ``spec``, or one built from ``axes=``, ``zip=``,
    ``seeds=`` (see `build_spec`). Every cell is validated before anything runs; a `SweepValidationError`
    lists every failing cell's problems. The run order comes from the cache keys every node of every
    cell would have (computed, nothing run), so it holds for any graph of any nodes."""
    wf = runtime.load(workflow)
    if spec is None:
        spec = build_spec(wf.prompt, runtime.registry, **axes)
    sources = image_sources(wf.prompt)
    if not sources:
        raise WorkflowError(f"{wf.source}: no SaveImage or PreviewImage fed by an image: a sweep has nothing to "
                            "draw", file=wf.source, kind="sweep_no_image",
                            fix="add a SaveImage after the sampler")
    reports = tuple(nid for nid, node in wf.prompt.items() if runtime.registry.canonical(node["class_type"]) in REPORT_NODES)
    cells, failures, state = [], [], {}
    for index, coords in enumerate(spec.coords()):
        overrides = spec.overrides(coords)
        prompt = apply_overrides(copy.deepcopy(wf.prompt), overrides, wf.source)
        cell = Cell(index, coords, overrides, prompt, sources, reports)
        try:
            with runtime.context():
                valid = validate_prompt(prompt, runtime.registry, runtime.folders)
        except ValidationError as exc:
            failures.append((cell, exc))
            cells.append(cell)
            continue
        try:
            keys = runtime.node_keys(valid)
        except LoomError:  # a file that cannot be fingerprinted now: the cell will say so when it runs
            keys = {}
        state[index] = _state_keys(valid, keys, runtime.registry)
        affinity = _affinity(valid, keys, runtime.registry) if keys else f"cell-{index}"
        cells.append(Cell(index, coords, overrides, prompt, sources, reports, affinity))
    if failures:
        raise SweepValidationError(failures, len(cells))
    result = SweepPlan(spec, wf.prompt, wf.ui, wf.source, cells)
    result.order = run_order(cells, state)
    return result
