"""The Python API: a Runtime that knows LoRA Loom's nodes and the user's own."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.abc
import logging
import os
import sys
import warnings
from pathlib import Path

from . import graph_runtime
from .nodes import ENV_NODE_MODULES, load_node_modules, register_node, registry
from .nodes.common import remove_stale_saves

# transformers 5 warns once per image-processor class it falls back from (e.g. "`CLIPImageProcessor`
# requires torchvision (not installed); falling back to `CLIPImageProcessorPil`") when a diffusers pipeline
# that carries one is built. We never process images with them, torchvision is not needed, and the
# advice to install it is noise: drop that one notice, leaving transformers' other messages and its
# verbosity as they are.
TORCHVISION_NOTICE = "requires torchvision (not installed)"
SHIPPED_WORKFLOWS = Path(__file__).resolve().parent / "workflows"
DEMO_LORA_DIR = SHIPPED_WORKFLOWS / "loras"


def is_shipped_workflow(workflow) -> bool:
    """Whether ``workflow`` is a path to one of the example workflows shipped in ``workflows/`` (the
    editor's format) or ``workflows/api/`` (the API format), whose demo LoRAs live in
    ``workflows/loras/``: the file itself, or a byte-identical copy of the same name (a clone's
    ``workflows/`` while the package is installed elsewhere)."""
    if not isinstance(workflow, (str, os.PathLike)):
        return False
    path = Path(workflow)
    shipped = next((d / path.name for d in (SHIPPED_WORKFLOWS, SHIPPED_WORKFLOWS / "api") if (d / path.name).is_file()),
                   None)
    if shipped is None or not path.is_file():
        return False
    if path.resolve() == shipped:
        return True
    # Sizes first: a huge file of the same name is not read into memory to be compared.
    return path.stat().st_size == shipped.stat().st_size and path.read_bytes() == shipped.read_bytes()


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_NOTICE not in record.getMessage()


def hide_torchvision_notice() -> None:
    """Drop transformers' torchvision fallback notice (see ``TORCHVISION_NOTICE``); idempotent. Runs when
    this module is imported: the Python API, the CLI and the server all build pipelines through it."""
    notices = logging.getLogger("transformers.utils.import_utils")  # the logger that warns (transformers 5)
    if not any(isinstance(f, _NoTorchvisionNotice) for f in notices.filters):
        notices.addFilter(_NoTorchvisionNotice())


hide_torchvision_notice()


class _Switch:
    """One library's progress-bar switch: the module that holds it and its functions to read it, turn
    it off and turn it on."""

    def __init__(self, module: str, is_on: str, off: str, on: str, inverted: bool = False):
        self.module, self.is_on, self.off, self.on, self.inverted = module, is_on, off, on, inverted

    def read(self, module) -> bool:
        return getattr(module, self.is_on)() != self.inverted

    def set(self, module, on: bool) -> None:
        # huggingface_hub warns when its switch is overridden by HF_HUB_DISABLE_PROGRESS_BARS, which then wins
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(module, self.on if on else self.off)()


# In this order: transformers' switch sets huggingface_hub's too, so hub's own state is set after it.
_SWITCHES = (
    _Switch("diffusers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar", "enable_progress_bar"),
    _Switch("transformers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar", "enable_progress_bar"),
    _Switch("huggingface_hub.utils", "are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars",
            inverted=True),
)


class _BarsOff(importlib.abc.MetaPathFinder):
    """The state of `library_progress_bars_off`, and its import hook: a switch module imported while it
    is installed runs with every switch as it was before the block (transformers 5 starts its switch
    from huggingface_hub's, which must not be read switched off by us), and when the outermost such
    import is done, every loaded switch is recorded (the first time) and turned off."""

    def __init__(self):
        self.before: dict[str, bool] = {}  # module name -> its bars were on before the block
        self.depth = 0  # switch modules being imported, one inside another

    def all_off(self) -> None:
        loaded = [(s, sys.modules[s.module]) for s in _SWITCHES if s.module in sys.modules]
        self.before.update({s.module: s.read(m) for s, m in loaded if s.module not in self.before})
        for switch, module in loaded:
            switch.set(module, False)

    def restore(self) -> None:
        for switch in _SWITCHES:
            if switch.module in self.before:
                switch.set(sys.modules[switch.module], self.before[switch.module])

    def find_spec(self, fullname, path, target=None):
        if fullname not in {s.module for s in _SWITCHES}:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _LoaderInBlock(spec.loader, self)
                    return spec
        return None


class _LoaderInBlock(importlib.abc.Loader):
    """The real loader of a switch module, run inside `_BarsOff`'s before/after."""

    def __init__(self, loader, block: _BarsOff):
        self._loader, self._block = loader, block

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        block = self._block
        if block.depth == 0:
            block.restore()
        block.depth += 1
        try:
            self._loader.exec_module(module)
        finally:
            block.depth -= 1
            if block.depth == 0:
                block.all_off()

    def __getattr__(self, name):  # get_data, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)


@contextlib.contextmanager
def library_progress_bars_off():
    """Within the block diffusers', transformers' and huggingface_hub's own progress bars ("Loading
    pipeline components", "Loading weights", "Writing model shards", "Fetching ... files") are off; after
    it they are as they were. The CLI uses it for ``--no-progress`` and when stderr is no terminal; the
    Python API leaves them alone unless asked: ``with library_progress_bars_off(): rt.run(...)``.

    It imports none of them: a library already imported is switched now, one imported inside the block
    as soon as it is (an import hook), so a run that never uses them (a graph of plugin nodes) does not
    pay the seconds their imports take."""
    block = _BarsOff()
    block.all_off()
    sys.meta_path.insert(0, block)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(block)
        block.restore()


class Runtime(graph_runtime.Runtime):
    """A :class:`graph_runtime.Runtime` whose registry holds LoRA Loom's nodes plus registered ones.

    ``demo_loras=True`` adds the shipped workflows' demo LoRAs (``workflows/loras/``) after the
    LoRA folders, for running those workflows; otherwise LoadLoRA sees only the configured folders
    (the CLI turns it on for a shipped workflow file, nothing else does).

    >>> rt = Runtime(lora_dirs=["loras"], output_dir="out", demo_loras=True)
    >>> result = rt.run("workflows/blend.json", overrides={"4.weight": 0.8})
    """

    def __init__(self, *, demo_loras: bool = False, **kwargs):
        kwargs.setdefault("registry", registry())
        super().__init__(**kwargs)
        if demo_loras and DEMO_LORA_DIR.is_dir() and DEMO_LORA_DIR not in self.folders.lora_dirs:
            # a new Folders: one the caller passed in is theirs, not ours to change
            self.folders = dataclasses.replace(self.folders, lora_dirs=[*self.folders.lora_dirs, DEMO_LORA_DIR])
        remove_stale_saves(self.folders)  # what a save killed mid-write (kill -9) left in the output folder


    def sweep(self, workflow, axes=(), *, zip=(), seeds=None, out=None, executor: str = "local",
              address: str | None = None, resume: bool = True, node_modules=None, on_event=None, on_cell=None):
        """Render ``workflow`` over axes of input values (an XY grid) on this runtime's warm cache and model
        pool, and write the cell images, the labelled grid(s) and the manifest under ``out`` (default
        ``<output>/sweeps/<workflow>-<hash>``). Returns a :class:`~loraloom.sweep.driver.SweepResult`.

        ``axes``: ``{"4.weight": [0, 0.5, 1]}`` (one axis per key) or a list of ``"4.weight=0,0.5,1"`` /
        dicts (a dict of several keys moves them together); ``zip``: more such zipped axes; ``seeds``: an axis
        over every seed input. First axis X, second Y, the rest Z (a grid each). Every cell is validated
        first (one :class:`~loraloom.sweep.spec.SweepValidationError` names every failing cell). A cell that
        fails is recorded and the rest run; ``resume`` skips the cells an earlier run finished. ``executor``:
        ``"local"`` or ``"ray"`` (at ``address``; needs the ``ray`` extra). ``on_event``: this runtime's
        events (local cells); ``on_cell(record, done, total)``: after each cell.

        >>> rt = Runtime(demo_loras=True)
        >>> result = rt.sweep("workflows/api/blend_api.json", {"4.weight": [0, 1], "4.weight_2": [0, 1]})
        """
        from .sweep.driver import make_executor, run_sweep
        from .sweep.executor import SweepJob
        from .sweep.spec import plan

        planned = plan(self, workflow, axes=axes, zip=zip, seeds=seeds)
        # the modules that registered nodes here (given, else LORALOOM_NODE_MODULES): a worker imports them too
        job = SweepJob.from_runtime(self, load_node_modules(node_modules))
        return run_sweep(self, planned, out, executor=make_executor(executor, self, address, on_event), job=job,
                         resume=resume, on_cell=on_cell)

__all__ = ["ENV_NODE_MODULES", "Runtime", "hide_torchvision_notice", "is_shipped_workflow",
           "library_progress_bars_off", "load_node_modules", "register_node"]
