"""ComfyUI node declarations (thin); algorithms live in kernels/."""
from comfy_api.latest import ComfyExtension, io

from ..kernels.methods import SPECS
from .maps_nodes import TokenMapOverlay, TokenMapRecorder
from .maps_route import register_routes
from .patch_node import patch_node
from .schedule_node import TokenRatioSchedule

PATCH_NODES = tuple(patch_node(spec) for spec in SPECS)  # MODEL in, patched MODEL out, one per method


class TokenReductionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*PATCH_NODES, TokenRatioSchedule, TokenMapRecorder, TokenMapOverlay]


async def comfy_entrypoint() -> TokenReductionExtension:
    register_routes()  # the token-map viewer's route, when ComfyUI's server is running
    return TokenReductionExtension()
