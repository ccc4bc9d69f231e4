"""Inside ComfyUI: folders from ComfyUI's folder_paths, progress to ComfyUI's progress bar, and
ComfyUI's interrupt button. Outside ComfyUI this module does nothing."""

from __future__ import annotations

from pathlib import Path

from .graph_runtime.context import ExecutionContext, set_default_context
from .graph_runtime.paths import Folders


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
    """ComfyUI's own folders: its ``loras`` paths, its models folder, its output folder."""
    import folder_paths

    return Folders([Path(p) for p in folder_paths.get_folder_paths("loras")], Path(folder_paths.models_dir),
                   Path(folder_paths.get_output_directory()))


def install_if_in_comfyui() -> bool:
    """Use ComfyUI's folders, progress and interrupt when running inside ComfyUI."""
    try:  # only ComfyUI has folder_paths; it is imported before any custom node loads
        import comfy.model_management  # noqa: F401
        import comfy.utils  # noqa: F401
        import folder_paths  # noqa: F401
    except ImportError:
        return False
    set_default_context(ComfyContext(folders=comfy_folders()))
    return True
