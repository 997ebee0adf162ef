"""ComfyUI-Chipmunk: training-free acceleration of diffusion transformers with Chipmunk's
dynamic column-sparse deltas. ComfyUI imports this folder as a custom node pack."""

from comfy_api.latest import ComfyExtension

from .nodes import NODES


class ChipmunkExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint() -> ComfyExtension:
    return ChipmunkExtension()
