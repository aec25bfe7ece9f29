"""Checkpoint layouts: the tensor names and shapes of real diffusion-model checkpoints, at reduced depth.

tools/comfy_host.py builds its tiny test models the way ComfyUI loads a checkpoint: the host's own
model detection reads a layout from tools/checkpoint_layouts.json (as meta tensors) and picks the model
class and its config, with every field that host version needs; only the sizes are then made tiny. So
the tests follow each host's detection instead of hand-written constructor arguments.

This tool writes the layouts, once per family, from the published full-size configs below (two blocks
each: depth is a size, and the host counts blocks from the names). Run it with a host that has the
family (COMFYUI_PATH), e.g. `python tools/checkpoint_layouts.py flux sd3`; it merges into the JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYOUTS_PATH = Path(__file__).resolve().parent / "checkpoint_layouts.json"  # read by tools/comfy_host.py

_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
         "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 2, "depth_single_blocks": 2,
         "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
_HUNYUAN_VIDEO = {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
                  "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 2,
                  "depth_single_blocks": 2, "axes_dim": [16, 56, 56], "theta": 256, "patch_size": [1, 2, 2],
                  "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False}
_WAN_13B = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16,
            "dim": 1536, "ffn_dim": 8960, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 12,
            "num_layers": 2, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}

# family -> (supported_models class, the published model's config at depth 2, fields that only newer hosts take)
FULL_SIZE = {
    "flux": ("Flux", _FLUX, {"txt_ids_dims": []}),
    "flux2": ("Flux2", {**_FLUX, "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
                        "context_in_dim": 15360, "hidden_size": 6144, "mlp_ratio": 3.0, "num_heads": 48,
                        "axes_dim": [32, 32, 32, 32], "theta": 2000, "patch_size": 1, "qkv_bias": False,
                        "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
                        "default_ref_method": "index", "ref_index_scale": 10.0}, {"txt_ids_dims": [3]}),
    "chroma": ("Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096,
                          "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 2, "depth_single_blocks": 2,
                          "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64,
                          "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5}, {"txt_ids_dims": []}),
    "sd3": ("SD3", {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "num_blocks": 2,
                    "pos_embed_max_size": 384, "num_patches": 384 * 384, "adm_in_channels": 2048,
                    "context_embedder_config": {"target": "torch.nn.Linear",
                                                "params": {"in_features": 4096, "out_features": 1536}},
                    "qk_norm": "rms", "x_block_self_attn_layers": []}, {}),
    "wan": ("WAN21_T2V", _WAN_13B, {}),
    "wan_vace": ("WAN21_Vace", {**_WAN_13B, "model_type": "vace", "vace_layers": 2, "vace_in_dim": 96}, {}),
    "qwen_image": ("QwenImage", {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
                                 "num_layers": 2, "attention_head_dim": 128, "num_attention_heads": 24,
                                 "joint_attention_dim": 3584, "pooled_projection_dim": 768,
                                 "axes_dims_rope": (16, 56, 56)}, {}),
    "hunyuan_video": ("HunyuanVideo", _HUNYUAN_VIDEO, {"use_cond_type_embedding": False, "vision_in_dim": None,
                                                       "meanflow_sum": False}),
    "hunyuan_image21": ("HunyuanImage21", {**_HUNYUAN_VIDEO, "in_channels": 64, "out_channels": 64, "vec_in_dim": None,
                                           "guidance_embed": False, "patch_size": [1, 1], "axes_dim": [64, 64],
                                           "hidden_size": 3584, "num_heads": 28},
                        {"use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False}),
    "hunyuan_video15": ("HunyuanVideo15", {**_HUNYUAN_VIDEO, "in_channels": 65, "out_channels": 32, "vec_in_dim": None,
                                           "guidance_embed": False, "patch_size": [1, 1, 1], "hidden_size": 2048,
                                           "num_heads": 16, "axes_dim": [16, 56, 56], "use_cond_type_embedding": True,
                                           "vision_in_dim": 1152}, {"meanflow_sum": True}),
    "lumina2": ("Lumina2", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 2304,
                            "cap_feat_dim": 2304, "n_layers": 2, "n_refiner_layers": 2, "n_heads": 24,
                            "n_kv_heads": 8, "qk_norm": True, "axes_dims": [32, 32, 32], "axes_lens": [300, 512, 512]},
                {}),
    "zimage": ("ZImage", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840,
                          "cap_feat_dim": 2560, "n_layers": 2, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30,
                          "qk_norm": True, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
                          "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
                          "time_scale": 1000.0, "pad_tokens_multiple": 32}, {}),
}


# The families new in ComfyUI 0.33 (their layouts are written with 0.33; older hosts skip them)
_WAN_14B = {**_WAN_13B, "dim": 5120, "ffn_dim": 13824, "num_heads": 40}
_ZIMAGE = FULL_SIZE["zimage"][1]
FULL_SIZE.update({
    "chroma_radiance": ("ChromaRadiance", {**FULL_SIZE["chroma"][1], "image_model": "chroma_radiance", "in_channels": 3,
                                           "out_channels": 3, "patch_size": 16, "nerf_hidden_size": 64,
                                           "nerf_mlp_ratio": 4, "nerf_depth": 4, "nerf_max_freqs": 8,
                                           "nerf_tile_size": 512, "nerf_final_head_type": "conv",
                                           "nerf_embedder_dtype": None},
                        {"txt_ids_dims": [], "vec_in_dim": None, "use_x0": False, "use_sequential_txt_ids": False}),
    # five blocks: Wan Animate has a face-adapter block per five, by which detection knows it
    "wan_animate": ("WAN22_Animate", {**_WAN_14B, "model_type": "animate", "in_dim": 36, "num_layers": 5}, {}),
    "wan_scail": ("WAN21_SCAIL", {**_WAN_14B, "model_type": "scail", "in_dim": 20}, {}),
    "wan_scail2": ("WAN21_SCAIL2", {**_WAN_14B, "model_type": "scail2", "in_dim": 20}, {}),
    "kandinsky5": ("Kandinsky5", {"image_model": "kandinsky5", "model_dim": 1792, "ff_dim": 7168, "time_dim": 512,
                                  "visual_embed_dim": 132, "patch_size": (1, 2, 2), "num_text_blocks": 2,
                                  "num_visual_blocks": 2, "axes_dims": (16, 24, 24)}, {}),
    "krea2": ("Krea2", {"image_model": "krea2", "features": 6144, "heads": 48, "kvheads": 12, "layers": 2,
                        "channels": 16, "patch": 2, "txtdim": 2560, "txtlayers": 12}, {}),
    "minimax_h3": ("MiniMaxH3", {"image_model": "minimax_h3", "num_layers": 2}, {}),
    "ltxav": ("LTXAV", {"image_model": "ltxav", "num_layers": 2}, {}),
    "zimage_pixel": ("ZImagePixelSpace", {**_ZIMAGE, "image_model": "zimage_pixel", "patch_size": 16, "in_channels": 3,
                                          "decoder_hidden_size": 3840, "decoder_num_res_blocks": 4,
                                          "decoder_max_freqs": 8, "decoder_in_channels": 16 * 16 * 3}, {}),
})


def layout(family: str) -> dict:
    """{tensor name: shape} of the family's published model at depth 2, built on the meta device by the host."""
    import torch
    import comfy.supported_models
    cls_name, config, newer = FULL_SIZE[family]
    for extra in ({}, newer):  # newer hosts require more constructor fields than older ones accept
        model_config = getattr(comfy.supported_models, cls_name)({**config, **extra})
        model_config.set_inference_dtype(torch.float32, None)
        try:
            with torch.device("meta"):
                model = model_config.get_model({}, device=torch.device("meta"))
            break
        except TypeError as e:
            if not extra and newer and "required" in str(e):
                continue
            raise
    return {k: list(v.shape) for k, v in model.diffusion_model.state_dict().items()}


def main(argv=None):
    from tools import comfy_host
    families = (argv if argv is not None else sys.argv[1:]) or list(FULL_SIZE)
    err = comfy_host.import_host()
    if err:
        sys.exit(err)
    layouts = json.loads(LAYOUTS_PATH.read_text()) if LAYOUTS_PATH.exists() else {}
    for family in families:
        layouts[family] = {"model_config": FULL_SIZE[family][0], "tensors": layout(family)}
        print(f"{family}: {len(layouts[family]['tensors'])} tensors")
    LAYOUTS_PATH.write_text(dumps(layouts))


def dumps(layouts: dict) -> str:
    """{family: {"model_config": the supported_models class detection must pick, "tensors": {name: shape}}},
    one tensor per line, so a changed layout reads as a short diff."""
    families = []
    for family, entry in sorted(layouts.items()):
        lines = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(entry["tensors"].items()))
        families.append(f'{json.dumps(family)}: {{\n  "model_config": {json.dumps(entry["model_config"])},\n'
                        f'  "tensors": {{\n{lines}\n  }}\n}}')
    return "{\n" + ",\n".join(families) + "\n}\n"


if __name__ == "__main__":
    main()
