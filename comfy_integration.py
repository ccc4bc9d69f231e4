"""Inside ComfyUI: folders from ComfyUI's folder_paths, progress to ComfyUI's progress bar, and
ComfyUI's interrupt button. Outside ComfyUI this module does nothing."""

from __future__ import annotations

from pathlib import Path

from .graph_runtime.context import ExecutionContext, set_default_context
from .graph_runtime.paths import FolderAdvice, Folders

# Inside ComfyUI there are no --lora-dir / --models-dir flags: files go into ComfyUI's own folders,
# and extra LoRA folders are added in its extra_model_paths.yaml (read by folder_paths at start).
COMFY_ADVICE = FolderAdvice(
    outside="give a path relative to the folder, or add the folder to ComfyUI's extra_model_paths.yaml",
    missing={
        "loras": "put it in ComfyUI/models/loras, or add its folder under 'loras:' in ComfyUI's "
                 "extra_model_paths.yaml and restart ComfyUI",
        "models": "put it under ComfyUI/models (single-file checkpoints in ComfyUI/models/checkpoints, "
                  "diffusers folders anywhere below ComfyUI/models)",
        "output": "give a name inside ComfyUI/output",
    },
)


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
                   Path(folder_paths.get_output_directory()), advice=COMFY_ADVICE)


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
