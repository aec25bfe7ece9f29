"""ComfyUI node declarations (thin); algorithms live in kernels/."""
from comfy_api.latest import ComfyExtension, io

from .cat_node import CATPruningPatchModel
from .density_node import TokenDensityPatchModel
from .maps_nodes import TokenMapOverlay, TokenMapRecorder
from .maps_route import register_routes
from .schedule_node import TokenRatioSchedule
from .sdtm_node import SDTMPatchModel


PATCH_NODES = (SDTMPatchModel, TokenDensityPatchModel, CATPruningPatchModel)  # MODEL in, patched MODEL out


class TokenReductionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SDTMPatchModel, TokenRatioSchedule, TokenDensityPatchModel, CATPruningPatchModel,
                TokenMapRecorder, TokenMapOverlay]


async def comfy_entrypoint() -> TokenReductionExtension:
    register_routes()  # the token-map viewer's route, when ComfyUI's server is running
    return TokenReductionExtension()
