"""LoRA Loom's nodes through ComfyUI's V3 node API (``comfy_entrypoint``, ``io.ComfyNode``), made from
the same schema and classes as its V1 ones (``NODE_CLASS_MAPPINGS``), so nothing is declared twice.

Each V1 class gives one ``io.ComfyNode`` subclass: its ``define_schema`` builds an ``io.Schema`` from the
node's schema each time ComfyUI asks (COMBO lists are read then, as V1's ``INPUT_TYPES`` reads them),
with every widget's options as V1 declares them; ``execute`` calls the node's own ``execute`` and hands
back what it returns (outputs, ``ui``, ``expand``) as an ``io.NodeOutput``; ``fingerprint_inputs`` and
``validate_inputs`` are V1's ``IS_CHANGED`` and ``VALIDATE_INPUTS`` (comfy_integration). Each old id of
a node (its schema's ``aliases``, a V1 class with ``ALIAS``) is one more, deprecated, V3 node.

Imported only inside a ComfyUI that has the V3 API (``comfy_api.latest``): the pack's ``__init__`` picks.
"""

from __future__ import annotations

import functools

from .comfy_integration import comfy_hidden, comfy_input_types, queue_check_function


def comfy_entrypoint_for(classes: dict[str, type], names: dict[str, str]):
    """ComfyUI's ``comfy_entrypoint`` (an async function returning a ``ComfyExtension``) listing the V3
    form of each of the V1 ``classes`` (id -> class, as ``NODE_CLASS_MAPPINGS``; ``names``: their
    display names, as ``NODE_DISPLAY_NAME_MAPPINGS``)."""
    from comfy_api.latest import ComfyExtension

    nodes = v3_nodes(classes, names)

    class LoraLoomExtension(ComfyExtension):
        """LoRA Loom's nodes."""

        async def get_node_list(self):
            return list(nodes)

    async def comfy_entrypoint():
        return LoraLoomExtension()

    return comfy_entrypoint


def v3_nodes(classes: dict[str, type], names: dict[str, str]) -> list[type]:
    """The V3 node classes for the V1 ``classes``: one per entry, deprecated where the entry is an old
    id's class (its ``ALIAS``: graph_runtime.schema.comfy_classes)."""
    return [v3_node(cls, node_id, names.get(node_id) or cls.SCHEMA.display_name, deprecated=hasattr(cls, "ALIAS"))
            for node_id, cls in classes.items()]


def v3_node(node_class: type, node_id: str, display_name: str, deprecated: bool = False) -> type:
    """The ``io.ComfyNode`` subclass running ``node_class`` (a node declared with ``@node``, in its
    ComfyUI form) under ``node_id``."""
    from comfy_api.latest import io

    schema = node_class.SCHEMA
    hidden = comfy_hidden(node_class)

    def define_schema(cls):
        types = comfy_input_types(node_class)
        return io.Schema(
            node_id=node_id, display_name=display_name, category=schema.category, description=schema.description,
            inputs=[v3_input(inp, types) for inp in schema.ordered_inputs()],
            outputs=[socket_type(out.type).Output(display_name=out.name or None, tooltip=out.tooltip or None)
                     for out in schema.outputs],
            hidden=[io.Hidden(kind) for kind in hidden.values()],
            is_output_node=schema.output_node, is_deprecated=deprecated, not_idempotent=schema.not_idempotent,
            # a node of ours that returns "expand" (SweepGrid inside ComfyUI) expands, as under V1
            enable_expand=True)

    def execute(cls, **inputs):
        # V3 hands the hidden inputs over on the class, V1 (and our execute) as arguments
        given = {name: getattr(cls.hidden, io.Hidden(kind).name) for name, kind in hidden.items()}
        return node_output(node_class().execute(**inputs, **given))

    def fingerprint_inputs(cls, **values):  # V1's change check, given the constants (None for a link)
        return node_class.IS_CHANGED(**values)

    attrs = {"__doc__": node_class.__doc__, "__module__": __name__, "LOOM_NODE": node_class,
             "define_schema": classmethod(define_schema), "execute": classmethod(execute),
             "fingerprint_inputs": classmethod(fingerprint_inputs)}
    check = queue_check_function(node_class)
    if check is not None:
        attrs["validate_inputs"] = classmethod(check)
    return type(node_id, (io.ComfyNode,), attrs)


def v3_input(inp, types: dict):
    """Our input ``inp`` as a V3 input, its options those of its entry in the V1 ``types``
    (``INPUT_TYPES()``): V3 writes the same entry back into ``/object_info``, COMBO lists as
    ``("COMBO", {"options": [...]})``."""
    from comfy_api.latest import io

    kind, *rest = types["optional" if inp.optional else "required"][inp.name]
    options = dict(rest[0]) if rest else {}
    common = {"optional": inp.optional, "tooltip": options.pop("tooltip", None), "lazy": options.pop("lazy", None),
              "default": options.pop("default", None)}
    if inp.type == "COMBO":
        made = io.Combo.Input(inp.name, options=list(kind), **common)
    elif inp.type in ("INT", "FLOAT"):
        numbers = {key: options.pop(key, None) for key in ("min", "max", "step")}
        if inp.type == "INT":
            made = io.Int.Input(inp.name, control_after_generate=options.pop("control_after_generate", None),
                                **numbers, **common)
        else:
            made = io.Float.Input(inp.name, **numbers, **common)
    elif inp.type == "STRING":
        made = io.String.Input(inp.name, multiline=options.pop("multiline", False), **common)
    elif inp.type == "BOOLEAN":
        made = io.Boolean.Input(inp.name, **common)
    else:
        common.pop("default")
        made = socket_type(inp.type).Input(inp.name, **common)
    made.extra_dict = options  # the rest as V1 says it (rawLink, our control widget's start mode)
    return made


@functools.cache
def socket_type(kind: str):
    """The V3 type of socket type ``kind``: ComfyUI's own where it declares one (IMAGE, MODEL, CLIP,
    ...: its nodes then connect to ours), else a custom type of that name (MODEL_RECIPE, ...)."""
    from comfy_api.latest import io

    for name in io.__all__:
        declared = getattr(io, name)
        if isinstance(declared, type) and issubclass(declared, io.ComfyTypeIO) and declared.io_type == kind:
            return declared
    return io.Custom(kind)


def node_output(result):
    """What a node of ours returns (a tuple, or a dict with ``result``, ``ui``, ``expand``) as V3's
    ``io.NodeOutput``."""
    from comfy_api.latest import io

    if isinstance(result, dict):
        return io.NodeOutput(*(result.get("result") or ()), ui=result.get("ui"), expand=result.get("expand"))
    return io.NodeOutput(*(result or ()))
