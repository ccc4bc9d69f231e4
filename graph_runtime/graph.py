"""Build the networkx DiGraph of a prompt and validate it, collecting every problem before anything runs.

Errors come in ComfyUI's ``node_errors`` shape. Nothing here recurses: a 10,000-node chain validates.
What a workflow may ask for is bounded by the current context's :class:`~.limits.Limits` (nodes,
characters of text); node classes check their own costs against them in ``check_inputs``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import networkx as nx

from .context import current_context
from .errors import InputError, LoomError, PathError, ValidationError
from .limits import Limits
from .paths import Folders
from .schema import Input, NodeRegistry
from .workflow import is_link


# A lone UTF-16 surrogate: JSON's "\ud800" escape without its pair decodes to one. It is no Unicode
# character, and tokenizers and UTF-8 encoders fail on it long after validation.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@dataclass
class ValidPrompt:
    """A prompt that passed validation: nodes (with defaults filled in), the graph, output node ids."""

    nodes: dict[str, dict]
    graph: nx.DiGraph
    outputs: list[str]
    order: list[str]


def _err(kind: str, message: str, details: str, input_name: str | None = None, /, **extra) -> dict:
    info = dict(extra)
    if input_name is not None:
        info["input_name"] = input_name
    return {"type": kind, "message": message, "details": details, "extra_info": info}


def _err_from(kind: str, message: str, error: LoomError, node_id: str, class_type: str, input_name: str | None = None,
              /, **extra) -> dict:
    """A node error from one of our errors: its text (placed at the node and input) is the details,
    its fields (value, limit, fix, kind, ...) join ``extra_info`` beside ComfyUI's own keys, which
    ComfyUI's frontend reads by name and so is not disturbed by more."""
    error.at(node=node_id, class_type=class_type, input=input_name)
    return _err(kind, message, error.render(), input_name, **{**error.fields(), **extra})


def _title(node_id: str, class_type: str, name: str | None = None) -> str:
    where = f"node {node_id} ({class_type})"
    return f"{where} input '{name}'" if name else where


def _fmt(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_widget(node_id: str, class_type: str, inp: Input, value, options_cache: dict,
                 limits: Limits | None = None) -> tuple[object, dict | None]:
    """Check one constant widget value. Returns (value, possibly converted; error dict or None)."""
    where = _title(node_id, class_type, inp.name)
    name = inp.name
    if inp.type in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, _err("invalid_input_type", "Input is not a number",
                               f"{where}: {_fmt(value)} is not {'an integer' if inp.type == 'INT' else 'a number'}",
                               name, received_value=_fmt(value))
        if not math.isfinite(value):
            return value, _err("value_not_finite", "Value is not finite",
                               f"{where}: {value} is not a finite number", name, received_value=str(value))
        if inp.type == "INT":
            if value != int(value):
                return value, _err("invalid_input_type", "Input is not an integer",
                                   f"{where}: {value} is not an integer", name, received_value=value)
            value = int(value)
        else:
            value = float(value)
        if inp.min is not None and value < inp.min:
            return value, _err("value_smaller_than_min", f"Value {value} smaller than min of {inp.min}",
                               f"{where}: {value} is below min {inp.min}", name,
                               received_value=value, min=inp.min)
        if inp.max is not None and value > inp.max:
            return value, _err("value_bigger_than_max", f"Value {value} bigger than max of {inp.max}",
                               f"{where}: {value} is above max {inp.max}", name,
                               received_value=value, max=inp.max)
    elif inp.type == "STRING":
        if not isinstance(value, str):
            return value, _err("invalid_input_type", "Input is not a string",
                               f"{where}: {_fmt(value)} is not a string", name, received_value=_fmt(value))
        limits = limits or Limits()
        if len(value) > limits.max_text_chars:
            too_long = InputError(f"{len(value)} characters is above the limit {limits.max_text_chars}.",
                                  value=len(value), limit=limits.max_text_chars, kind="value_too_long",
                                  fix=limits.fix("max_text_chars"))
            return value, _err_from("value_too_long", f"Text of {len(value)} characters is longer than the limit "
                                    f"{limits.max_text_chars}", too_long, node_id, class_type, name,
                                    received_length=len(value), max_length=limits.max_text_chars)
        bad = _SURROGATE_RE.search(value)
        if bad is not None:
            code = f"U+{ord(bad.group()):04X}"
            lone = InputError(f"character {bad.start()} is a lone surrogate {code} (half of a UTF-16 pair, e.g. "
                              "a JSON \\ud800 escape without its partner), which is not a Unicode character.",
                              value=code, kind="invalid_text", fix="remove it, or write the character itself")
            return value, _err_from("invalid_text", "Text is not valid Unicode", lone, node_id, class_type, name,
                                    position=bad.start(), character=code)
    elif inp.type == "BOOLEAN":
        if not isinstance(value, bool):
            return value, _err("invalid_input_type", "Input is not a boolean",
                               f"{where}: {_fmt(value)} is not true or false", name, received_value=_fmt(value))
    elif inp.type == "COMBO":
        key = (class_type, name)
        if key not in options_cache:
            options_cache[key] = inp.option_list()
        options = options_cache[key]
        if value not in options:
            shown = ", ".join(map(repr, options[:20])) + (" ..." if len(options) > 20 else "")
            return value, _err("value_not_in_list", "Value not in list",
                               f"{where}: {_fmt(value)} is not one of [{shown}]" if options
                               else f"{where}: {_fmt(value)} is not available: there are no choices "
                                    "(is the folder empty or not configured?)",
                               name, received_value=_fmt(value), input_config=options[:100])
    return value, None


def validate_prompt(prompt: dict, registry: NodeRegistry, folders: Folders | None = None) -> ValidPrompt:
    """Validate every node and link; raise :class:`ValidationError` listing all problems."""
    limits = current_context().limits
    if len(prompt) > limits.max_nodes:
        too_large = InputError(f"the workflow has {len(prompt)} nodes, above the limit {limits.max_nodes}.",
                               value=len(prompt), limit=limits.max_nodes, kind="prompt_too_large",
                               fix=limits.fix("max_nodes"))
        raise ValidationError(_err("prompt_too_large", "Prompt has too many nodes", too_large.render(),
                                   nodes=len(prompt), max_nodes=limits.max_nodes, **too_large.fields()), {})
    errors: dict[str, list[dict]] = {}
    graph = nx.DiGraph()
    nodes: dict[str, dict] = {}
    options_cache: dict = {}
    linked_checks = False  # whether a node's rules also see what is known upstream (after this loop)

    for node_id, entry in prompt.items():
        class_type = entry["class_type"]
        graph.add_node(node_id)
        cls = registry.get(class_type)
        problems = errors.setdefault(node_id, [])
        if cls is None:
            missing = LoomError(f"no node type '{class_type}' is registered.", value=class_type,
                                kind="missing_node_type",
                                fix="check the spelling, or install the pack that provides it")
            problems.append(_err_from("missing_node_type", f"Node '{class_type}' not found", missing, node_id,
                                      class_type, node_id=node_id))
            nodes[node_id] = {"class_type": class_type, "inputs": dict(entry["inputs"])}
            for name, value in entry["inputs"].items():
                if is_link(value) and str(value[0]) in prompt:
                    graph.add_edge(str(value[0]), node_id)
            continue
        schema = cls.SCHEMA
        given = entry["inputs"]
        inputs = {}
        for name in given:
            if schema.input(name) is None:
                known = ", ".join(i.name for i in schema.inputs) or "none"
                problems.append(_err("unknown_input", "Unknown input",
                                     f"{_title(node_id, class_type, name)}: {class_type} has no such input "
                                     f"(inputs: {known})", name))
        for inp in schema.inputs:
            where = _title(node_id, class_type, inp.name)
            if inp.name not in given:
                if inp.is_widget and inp.has_default:
                    inputs[inp.name] = inp.default
                elif not inp.optional:
                    problems.append(_err("required_input_missing", "Required input is missing",
                                         f"{where}: required input is missing"
                                         + ("" if inp.is_widget else f" (connect a {inp.type} output)"),
                                         inp.name))
                continue
            value = given[inp.name]
            if not inp.is_widget or is_link(value):
                if not is_link(value):
                    if isinstance(value, (list, tuple)):
                        problems.append(_err("bad_linked_input", "Bad linked input, must be a length-2 list "
                                             "of [node_id, slot_index]", f"{where}: {_fmt(value)} is not "
                                             "[node_id, slot_index]", inp.name, received_value=_fmt(value)))
                    else:
                        problems.append(_err("invalid_input_type", "Input must be a link",
                                             f"{where}: {_fmt(value)} given, but this input takes a link from a "
                                             f"{inp.type} output", inp.name, received_value=_fmt(value)))
                    continue
                problem = _check_link(prompt, registry, where, inp, str(value[0]), value[1])
                if problem is not None:
                    problems.append(problem)
                    continue
                inputs[inp.name] = [str(value[0]), value[1]]
                graph.add_edge(str(value[0]), node_id)
                continue
            value, problem = check_widget(node_id, class_type, inp, value, options_cache, limits)
            not_listed = problem is not None and problem["type"] == "value_not_in_list"
            file_not_listed = not_listed and inp.file_kind and folders is not None
            refused = _refusal(folders, inp.file_kind, value) if file_not_listed else None
            if refused is not None:  # a name no folder may offer ('..', absolute, a link out): say why
                problem = _err_from("value_not_in_list", "Value not in list", refused, node_id, class_type, inp.name,
                                    received_value=_fmt(value))
            elif file_not_listed:
                # the choices are the files in these folders: name them, and any that does not exist
                problem["details"] += f"; searched {folders.searched(inp.file_kind)}."
                problem["extra_info"]["fix"] = folders.advice.missing[inp.file_kind]
                problem["details"] = LoomError(problem["details"], fix=problem["extra_info"]["fix"]).render()
            if problem is None and inp.file_kind and inp.type == "STRING" and value and folders is not None:
                try:
                    folders.find(inp.file_kind, value)
                except PathError as exc:
                    problem = _err_from("invalid_file", "File not found or not allowed", exc, node_id, class_type,
                                        inp.name, received_value=_fmt(value))
            if problem is not None:
                problems.append(problem)
            inputs[inp.name] = value
        check = getattr(cls, "check_inputs", None)
        if check is not None:
            # Every problem at once: the node's own rules run beside the widget checks, on the constants
            # that passed them (a value out of range or of the wrong type never reaches a rule that would
            # misread or crash on it; a rule over several inputs skips when one of them is absent).
            failed = {problem["extra_info"].get("input_name") for problem in problems}
            constants = {k: v for k, v in inputs.items() if not is_link(v) and k not in failed}
            problems.extend(_run_check(lambda: check(constants), bool(failed), node_id, class_type, "check_inputs"))
        linked_checks = linked_checks or hasattr(cls, "check_upstream")
        nodes[node_id] = {"class_type": class_type, "inputs": inputs}

    _check_cycles(graph, prompt, errors)
    if linked_checks and nx.is_directed_acyclic_graph(graph):
        _check_upstream(graph, nodes, registry, errors)
    outputs = [nid for nid, e in prompt.items()
               if (cls := registry.get(e["class_type"])) is not None and cls.SCHEMA.output_node]
    node_errors = {nid: errs for nid, errs in errors.items() if errs}
    if not outputs:
        raise ValidationError(_err("prompt_no_outputs", "Prompt has no outputs",
                                   "the workflow has no output node (e.g. SaveImage, SaveLoRA); "
                                   "add one so there is something to run"), _shape(node_errors, prompt, graph, []))
    if node_errors:
        raise ValidationError(_err("prompt_outputs_failed_validation", "Prompt outputs failed validation", ""),
                              _shape(node_errors, prompt, graph, outputs))
    return ValidPrompt(nodes, graph, outputs, list(nx.topological_sort(graph)))


def _run_check(check, partial: bool, node_id: str, class_type: str, name: str) -> list[dict]:
    """The node errors of one of a node class's rules (``check()``: {input name: problem})."""
    try:
        found = check() or {}
    except LoomError as exc:  # a check may raise its problem instead of returning it
        found = {exc.input: exc}
    except Exception as exc:  # noqa: BLE001 - a broken checker is reported, not raised
        # ... unless it was not given every value: one that assumed an input present (a refused
        # one, already reported) is not broken, and its crash would only add noise.
        found = {} if partial else {None: f"{name} raised {type(exc).__name__}: {exc}"}
    problems = []
    for input_name, problem in found.items():
        if isinstance(problem, LoomError):
            problems.append(_err_from("invalid_input", "Invalid input", problem, node_id, class_type, input_name))
        else:
            problems.append(_err("invalid_input", "Invalid input",
                                 f"{_title(node_id, class_type, input_name)}: {problem}", input_name))
    return problems


def _check_upstream(graph: nx.DiGraph, nodes: dict, registry: NodeRegistry, errors: dict) -> None:
    """The rules that depend on what feeds a node (e.g. which architecture a model is), before anything runs.

    A node class may say what is known of its outputs without running (``output_facts(constants,
    upstream) -> dict | None``, e.g. {"arch": "flux"}) and check its inputs against what is known of
    its links (``check_upstream(constants, upstream) -> {input: problem}``, like check_inputs).
    ``upstream`` maps each linked input to the facts of the node it is linked to (absent: unknown);
    ``constants`` are the node's constant inputs that no earlier check refused. Facts flow in
    dependency order, so a node that passes its model through (``output_facts`` returning
    ``upstream.get("model")``) hands its base's facts on. Working a fact out may fail (a file that is
    not what it claims): the fact is then unknown, and the node's own run reports the problem."""
    facts: dict[str, dict] = {}
    for node_id in nx.topological_sort(graph):
        cls = registry.get(nodes[node_id]["class_type"]) if node_id in nodes else None
        describe, check = getattr(cls, "output_facts", None), getattr(cls, "check_upstream", None)
        if describe is None and check is None:
            continue
        inputs = nodes[node_id]["inputs"]
        refused = {problem["extra_info"].get("input_name") for problem in errors.get(node_id, ())}
        constants = {k: v for k, v in inputs.items() if not is_link(v) and k not in refused}
        upstream = {k: facts[v[0]] for k, v in inputs.items() if is_link(v) and v[0] in facts}
        if describe is not None:
            try:
                found = describe(constants, upstream)
            except Exception:  # noqa: BLE001 - unknown, not wrong: the run reports what this tripped on
                found = None
            if found:
                facts[node_id] = found
        if check is not None and upstream:
            errors.setdefault(node_id, []).extend(
                _run_check(lambda: check(constants, upstream), bool(refused), node_id, nodes[node_id]["class_type"],
                           "check_upstream"))


def _refusal(folders: Folders, kind: str, name) -> PathError | None:
    """The error refusing ``name`` outright in the ``kind`` folders (not merely not found), or None."""
    try:
        folders.find(kind, name)
    except PathError as exc:
        return None if exc.kind == "not_found" else exc
    return None


def _check_link(prompt: dict, registry: NodeRegistry, where: str, inp: Input, src_id: str, slot: int):
    """The error of a link ``[src_id, slot]`` into ``inp``, or None when it is sound."""
    src = prompt.get(src_id)
    if src is None:
        return _err("bad_linked_input", "Linked node does not exist",
                    f"{where}: linked to node {src_id}, which is not in the workflow",
                    inp.name, linked_node=[src_id, slot])
    src_cls = registry.get(src["class_type"])
    if src_cls is None:
        return None  # reported on the source node itself
    outs = src_cls.SCHEMA.outputs
    if not 0 <= slot < len(outs):
        return _err("bad_linked_input", "Output slot out of range",
                    f"{where}: node {src_id} ({src['class_type']}) has no output slot {slot} "
                    f"(it has {len(outs)})", inp.name, linked_node=[src_id, slot])
    if outs[slot].type != inp.type:
        return _err("return_type_mismatch", "Return type mismatch between linked nodes",
                    f"{where}: expects {inp.type}, but node {src_id} ({src['class_type']}) "
                    f"output {slot} is {outs[slot].type}", inp.name,
                    received_type=outs[slot].type, linked_node=[src_id, slot])
    return None


def _check_cycles(graph: nx.DiGraph, prompt: dict, errors: dict) -> None:
    for component in nx.strongly_connected_components(graph):
        if len(component) == 1:
            (only,) = component
            if not graph.has_edge(only, only):
                continue
        ring = sorted(component, key=lambda n: (len(n), n))
        names = " -> ".join(f"{n} ({prompt[n]['class_type']})" for n in ring if n in prompt)
        for nid in ring:
            if nid in prompt:
                errors.setdefault(nid, []).append(
                    _err("dependency_cycle", "Dependency cycle detected",
                         f"node {nid} ({prompt[nid]['class_type']}) is on a cycle: {names}; "
                         "a workflow must be acyclic", cycle=ring))


def _shape(node_errors: dict, prompt: dict, graph: nx.DiGraph, outputs: list[str]) -> dict:
    dependents = _dependent_outputs(graph, outputs, node_errors)
    shaped = {}
    for nid, errs in node_errors.items():
        shaped[nid] = {"class_type": prompt[nid]["class_type"] if nid in prompt else None,
                       "errors": errs, "dependent_outputs": sorted(dependents.get(nid, []))}
    return shaped


def _dependent_outputs(graph: nx.DiGraph, outputs: list[str], wanted) -> dict[str, list[str]]:
    """For each node in ``wanted``, the output nodes that are it or downstream of it, in time linear in the graph
    (asking networkx for each failing node's descendants is quadratic: a 10,000-node chain of
    invalid nodes took a minute). Cycles are allowed here: the graph may be the invalid one."""
    if not outputs:
        return {}
    bit = {o: 1 << i for i, o in enumerate(outputs)}
    dag = nx.condensation(graph)
    members = dag.graph["mapping"]  # node -> its strongly connected component
    reach: dict[int, int] = {}
    # Outputs reachable from a component, as a bit set (a Python int): its own outputs, then its successors'.
    for comp in reversed(list(nx.topological_sort(dag))):
        mask = 0
        for nid in dag.nodes[comp]["members"]:
            mask |= bit.get(nid, 0)
        for succ in dag.successors(comp):
            mask |= reach[succ]
        reach[comp] = mask
    out = {}
    for nid in wanted:
        if nid not in members:
            continue
        mask, found = reach[members[nid]], []
        while mask:
            low = mask & -mask
            found.append(outputs[low.bit_length() - 1])
            mask ^= low
        out[nid] = found
    return out
