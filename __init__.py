"""LoRA Loom: combine LoRAs on diffusion models in a cached node graph.

This folder is both the Python package ``loraloom`` and a ComfyUI custom node pack. Importing it is
cheap: no torch and no model building happen at import time.
"""
