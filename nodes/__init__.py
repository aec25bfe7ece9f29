"""ComfyUI node declarations (thin); algorithms live in kernels/."""
from comfy_api.latest import ComfyExtension, io

from .sdtm_node import SDTMPatchModel


class TokenReductionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SDTMPatchModel]


async def comfy_entrypoint() -> TokenReductionExtension:
    return TokenReductionExtension()
