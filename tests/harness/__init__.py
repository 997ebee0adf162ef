"""Helpers for testing the pack inside a real ComfyUI: locating it, running it, talking to it.

- ``paths``: where the repository, the ComfyUI checkout and the pack's link folder are.
- ``server``: a ComfyUI server subprocess and the HTTP calls tests make to it.
- ``prompts``: API-format prompts (graphs) for the tiny models.
- ``inprocess``: ComfyUI imported into the test process, running real nodes and samplers.
"""
