"""Inside ComfyUI: folders from ComfyUI's folder_paths, progress to ComfyUI's progress bar,
ComfyUI's interrupt button, our input checks when a prompt is queued (``VALIDATE_INPUTS``), and what
ComfyUI's two node APIs (V1 class attributes, V3 ``io.ComfyNode``: see comfy_v3.py) both take from a
node's schema, derived here once. Outside ComfyUI this module does nothing."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Iterable

from .graph_runtime.context import ExecutionContext, current_context, set_default_context
from .graph_runtime.errors import LoomError, ValidationError
from .graph_runtime.graph import validate_prompt
from .graph_runtime.limits import Limits, env_name
from .graph_runtime.paths import FolderAdvice, Folders
from .graph_runtime.schema import NodeRegistry, Output, node

# Inside ComfyUI there are no --lora-dir / --models-dir flags: files go into ComfyUI's own folders,
# and extra LoRA folders are added in its extra_model_paths.yaml (read by folder_paths at start).
COMFY_ADVICE = FolderAdvice(
    outside={"loras": "give a path relative to the folder, or add the folder under 'loras:' in ComfyUI's "
                      "extra_model_paths.yaml",
             "models": "give a path relative to ComfyUI/models",
             "output": "give a name relative to ComfyUI/output (ComfyUI's --output-directory)",
             "checkpoints": "give a name as ComfyUI's checkpoint loader lists it (relative to its checkpoints "
                            "folder)"},
    missing={
        "loras": "put it in ComfyUI/models/loras, or add its folder under 'loras:' in ComfyUI's "
                 "extra_model_paths.yaml and restart ComfyUI",
        "models": "put it under ComfyUI/models (single-file checkpoints in ComfyUI/models/checkpoints, "
                  "diffusers folders anywhere below ComfyUI/models)",
        "output": "give a name inside ComfyUI/output",
        "checkpoints": "put it in ComfyUI/models/checkpoints (a Flux / SD3.5 transformer also in "
                       "ComfyUI/models/diffusion_models), or add its folder under 'checkpoints:' in ComfyUI's "
                       "extra_model_paths.yaml and restart ComfyUI",
    },
)


class ComfyLimits(Limits):
    """The limits inside ComfyUI: from the environment, which is the one way to raise them there."""

    def fix(self, name: str) -> str:
        return f"ask for less, or raise the limit: start ComfyUI with {env_name(name)}=N in its environment"


class ComfyContext(ExecutionContext):
    """The default context while ComfyUI's executor runs our nodes."""

    def progress(self, value: int, total: int) -> None:
        import comfy.utils

        bar = getattr(self, "_bar", None)
        if bar is None or bar.total != total:
            bar = self._bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(value, total)
        self.check_interrupt()

    def check_interrupt(self) -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()


def comfy_folders() -> Folders:
    """ComfyUI's own folders: its ``loras``, ``checkpoints`` and ``diffusion_models`` paths
    (extra_model_paths.yaml's included: ComfyUI reads that file before it imports any custom node),
    its models folder, its output folder; SaveLoRA writes into its first ``loras`` folder (the one
    ComfyUI's own downloads go to), so its LoraLoader and ours list a saved LoRA; a checkpoint's
    config "auto" may read the CLIP and T5 tokenizer files ComfyUI ships (comfy/sd1_tokenizer,
    comfy/text_encoders/t5_tokenizer, used where it is installed) and finds a Flux / SD3.5
    transformer's text encoders and VAE in its ``text_encoders`` and ``vae`` folders."""
    import comfy
    import folder_paths

    def paths(kind: str) -> list[Path]:
        return [Path(p) for p in folder_paths.get_folder_paths(kind)]

    loras = paths("loras")
    # comfy is a namespace package (no __init__.py, so no __file__): its folder is its __path__
    comfy_dirs = [Path(p) for p in getattr(comfy, "__path__", [])]
    return Folders(loras, Path(folder_paths.models_dir), Path(folder_paths.get_output_directory()),
                   advice=COMFY_ADVICE,
                   checkpoint_dirs=paths("checkpoints") + paths("diffusion_models"),
                   tokenizer_dirs=[p / "sd1_tokenizer" for p in comfy_dirs],
                   part_dirs={"text_encoders": paths("text_encoders"), "vae": paths("vae"),
                              "t5_tokenizer": [p / "text_encoders" / "t5_tokenizer" for p in comfy_dirs]},
                   lora_save_dir=loras[0] if loras else None)


def in_comfyui() -> bool:
    """Whether this process is ComfyUI (its own modules importable; it imports them before any pack)."""
    try:  # only ComfyUI has folder_paths
        import comfy.model_management  # noqa: F401
        import comfy.utils  # noqa: F401
        import folder_paths  # noqa: F401
    except ImportError:
        return False
    return True


def install_if_in_comfyui() -> bool:
    """Use ComfyUI's folders, progress and interrupt when running inside ComfyUI."""
    if not in_comfyui():
        return False
    set_default_context(ComfyContext(folders=comfy_folders(), limits=ComfyLimits.configure()))
    return True


# --- which of ComfyUI's node APIs the pack uses ---

ENV_COMFY_NODES = "LORALOOM_COMFY_NODES"
NODE_APIS = ("v1", "v3")


def comfy_node_api() -> str | None:
    """``"v3"`` when ComfyUI's V3 node API (``comfy_api.latest``) is importable, else ``"v1"``; the
    environment variable LORALOOM_COMFY_NODES (v1 or v3) forces one. None outside ComfyUI, whatever
    the variable says: there the pack is the Python API, whose ``NODE_CLASS_MAPPINGS`` is V1's."""
    if not in_comfyui():
        return None
    forced = os.environ.get(ENV_COMFY_NODES, "").strip().lower()
    if forced and forced not in NODE_APIS:
        raise LoomError(f"{ENV_COMFY_NODES}={forced!r} is not one of {list(NODE_APIS)}", key=ENV_COMFY_NODES,
                        value=forced, kind="bad_comfy_nodes", fix=f"set {ENV_COMFY_NODES} to v1 or v3, or unset it")
    if forced == "v1":
        return "v1"
    try:
        from comfy_api.latest import ComfyExtension, io  # noqa: F401
    except ImportError as exc:
        if forced == "v3":
            raise LoomError(f"{ENV_COMFY_NODES}=v3 but this ComfyUI has no V3 node API ({exc})", key=ENV_COMFY_NODES,
                            value=forced, kind="no_comfy_v3",
                            fix=f"update ComfyUI (0.3.64 has it), or unset {ENV_COMFY_NODES}") from None
        return "v1"
    return "v3"


# --- what V1 and V3 both declare, derived from the schema here once ---
#
# A lazy input of ours (Input.lazy) reaches the node as the link itself: ComfyUI's "lazy" (nothing
# upstream runs for it) with "rawLink" (get_input_data then passes [node id, slot], not a value). A
# class may take some of ComfyUI's hidden inputs (COMFY_HIDDEN: parameter name -> ComfyUI's kind,
# "PROMPT", "UNIQUE_ID", ...): V1 passes them as arguments, V3 through ``cls.hidden``, which
# comfy_v3 turns back into the same arguments.

RAW_LINK = "rawLink"


def comfy_hidden(cls: type) -> dict[str, str]:
    """The hidden inputs node class ``cls`` takes: its parameter name -> ComfyUI's hidden kind."""
    return dict(getattr(cls, "COMFY_HIDDEN", {}))


def comfy_input_types(cls: type) -> dict:
    """Node class ``cls``'s ``INPUT_TYPES()`` as ComfyUI takes it (V1 directly, V3 through
    comfy_v3): the schema's, its lazy links raw, and its hidden inputs."""
    types = cls.SCHEMA.input_types()
    for inp in cls.SCHEMA.inputs:
        if inp.lazy:
            group = types["optional" if inp.optional else "required"]
            kind, *options = group[inp.name]
            group[inp.name] = (kind, {**(options[0] if options else {}), RAW_LINK: True})
    hidden = comfy_hidden(cls)
    if hidden:
        types["hidden"] = hidden
    return types


# --- our checks when ComfyUI queues a prompt ---
#
# ComfyUI (execution.validate_inputs, 0.3.64) calls a node class's VALIDATE_INPUTS classmethod when a
# prompt is queued, before anything runs. It reads the parameter names (inspect.getfullargspec(...).args)
# and passes, of the inputs the prompt gives, those it names: a constant as its value (after ComfyUI's
# int()/float()/str()/bool() conversion), a linked input as None (its value does not exist yet). An
# input it names skips ComfyUI's own min/max/list checks, so ours, which say more, replace them. It
# takes True, or a text it reports once for every input it passed ("<input> - <text>"): so only the
# widgets are named (never the links), and each line of our text names the input it is about.
#
# Our checks are the ones `loraloom validate` runs: validate_prompt over a one-node prompt whose
# linked inputs come from a stand-in upstream node, so link checks pass and the node's own rules
# (check_inputs) see exactly the constants.

UPSTREAM = "QueuedUpstream"


def queue_check(cls: type, values: dict, node_id: str | None = None) -> bool | str:
    """``True`` when the constants in ``values`` (ComfyUI's VALIDATE_INPUTS arguments: None for a
    linked input) pass our validation of node class ``cls``; else our messages, one line per problem."""
    schema = cls.SCHEMA
    node_id = node_id or "?"
    slot = {inp.name: i for i, inp in enumerate(schema.inputs)}
    inputs = {}
    for inp in schema.inputs:
        value = values.get(inp.name)
        # a link, or a widget fed by one (None: no constant is None after ComfyUI's conversion, but
        # a COMBO's null, which then fails when the node runs); ComfyUI itself reports a missing link
        if not inp.is_widget or (inp.name in values and value is None):
            inputs[inp.name] = [UPSTREAM, slot[inp.name]]
        elif inp.name in values:
            inputs[inp.name] = value
    # Under the id the node was placed with (an alias's class says which), as `loraloom validate` names it.
    class_type = getattr(cls, "ALIAS", schema.id)
    prompt = {UPSTREAM: {"class_type": UPSTREAM, "inputs": {}}, node_id: {"class_type": class_type, "inputs": inputs}}
    try:
        validate_prompt(prompt, _registry_with_upstream(cls), current_context().folders)
    except ValidationError as exc:
        problems = exc.node_errors.get(node_id, {}).get("errors", [])
        if problems:
            return "\n".join(p["details"] or p["message"] for p in problems)
    return True


@functools.cache
def _registry_with_upstream(cls: type) -> NodeRegistry:
    """``cls`` and a stand-in node whose output ``i`` has the type of ``cls``'s input ``i``."""

    class Upstream:
        """Stands in for whatever ComfyUI links into ``cls``; it is validated, never run."""

        def execute(self):
            return ()

    outputs = [Output(inp.type, inp.name) for inp in cls.SCHEMA.inputs]
    # a comfy-only node's links carry ComfyUI's own types (MODEL, CLIP), so its stand-in's outputs do too
    comfy_only = cls.SCHEMA.comfy_only
    upstream = node(category="", id=UPSTREAM, outputs=outputs, output_node=True, comfy_export=False,
                    comfy_only=comfy_only)(Upstream)
    return NodeRegistry([cls, upstream], comfy=True)


def add_queue_checks(classes: Iterable[type]) -> None:
    """Give each node class a ``VALIDATE_INPUTS`` running :func:`queue_check` on its widget values."""
    for cls in classes:
        check = queue_check_function(cls)
        if check is not None:
            cls.VALIDATE_INPUTS = classmethod(check)


def queue_check_function(node_class: type):
    """The queue-time check of ``node_class`` as ComfyUI calls it (V1 ``VALIDATE_INPUTS``, V3
    ``validate_inputs``: a function of the class and the widgets' values, to wrap in a classmethod);
    None when the node has no widget (nothing constant to check; ComfyUI checks the links' types)."""
    names = [inp.name for inp in node_class.SCHEMA.widgets]
    if not names:
        return None

    def check(cls, **values):  # cls: the class ComfyUI calls it on, the V1 class or a V3 class made from it
        return queue_check(node_class, values, _comfy_node_id())

    # ComfyUI picks the arguments by the names getfullargspec reports: give it ours, each with a
    # default (an optional input the prompt leaves out is not passed).
    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names]
    check.__signature__ = inspect.Signature(params)
    return check


def _comfy_node_id() -> str | None:
    """The id of the node ComfyUI is validating (it sets its executing context around the call)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    return None if ctx is None else str(ctx.node_id)
