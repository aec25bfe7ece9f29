"""Token reduction for diffusion transformers in ComfyUI: SDTM, CAT pruning, density and ratio schedules.

ComfyUI loads this folder as a custom-node package. All imports inside the pack
are relative, so its `nodes` package never collides with ComfyUI's own
top-level `nodes` module.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
