"""Sweeps: one workflow rendered over axes of input values (an XY grid), on a warm runtime.

A sweep is planned into cells (the workflow with one value per axis set), every cell validated up
front, run in an order that reuses loaded LoRAs, merges and patched weights, locally or on Ray actors
that each hold a runtime; the driver alone writes the files (cell images, grid, manifest).
"""
