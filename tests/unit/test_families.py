"""kernels/families.py: how families with their own block arguments and layouts are read, host-free."""
import torch

from kernels import families
from kernels.families import CONDS_KEY, block_view, image_span, scail_family


def test_minimax_h3_block_args_show_a_batch_of_one_and_keep_the_video_segment_modulated():
    """The runners see MiniMax H3's batch-less sequence as a batch of one; a reduced video keeps its segment's
    modulation row over its new length, and the host's block gets its own arguments back."""
    family = families.minimax_h3_family("MiniMaxH3", 1)
    n_text, n_audio, n_video = 3, 4, 12
    h = torch.randn(n_text + n_audio + n_video, 8)
    segments = [(0, 3, 1), (3, 7, 2), (7, 19, 0)]
    args = {"img": h, "t_emb": torch.randn(2, 8), "mod_segments": segments, "rope_freqs": torch.randn(1, 19, 1, 2, 2, 2),
            "transformer_options": {}}
    seen = {}

    def host_block(a):
        seen.update(a)
        return {"img": a["img"] * 2}

    view, block, back = block_view(family, args, host_block)
    assert view["img"].shape == (1, 19, 8) and view["pe"] is args["rope_freqs"]
    span = image_span(family.blocks[0], view, n_video, 0, family)
    assert (span.img_start, span.n_img, span.pe_dim) == (7, 12, 1)
    out = block({**view, "img": view["img"][:, :13], "pe": view["pe"][:, :13]})
    assert seen["img"].shape == (13, 8) and seen["mod_segments"] == [(0, 3, 1), (3, 7, 2), (7, 13, 0)]
    assert seen["rope_freqs"].shape[1] == 13 and "pe" not in seen
    assert out["img"].shape == (1, 13, 8) and back(out)["img"].shape == (13, 8)


def test_minimax_h3_masked_video_runs_unreduced_with_the_reason():
    family = families.minimax_h3_family("MiniMaxH3", 1)
    args = {"img": torch.randn(10, 8), "mod_segments": [(0, 2, 1), (2, 10, torch.zeros(8, dtype=torch.long))],
            "rope_freqs": torch.randn(1, 10, 1, 2, 2, 2)}
    view, _, _ = block_view(family, args, lambda a: a)
    assert isinstance(view, str) and "per token" in view


def test_families_without_block_args_pass_the_call_through():
    family = families.flux_family("F", 1, 0)
    args = {"img": torch.randn(1, 4, 2)}
    view, block, back = block_view(family, args, lambda a: {"img": a["img"]})
    assert view is args and back({"img": 1}) == {"img": 1}


def scail_call(n_ref_frames: int, n_video_frames: int, n_pose: int, concat_frames: int = 0, reference=True):
    h, w = 5, 7
    grid = (n_ref_frames + n_video_frames + concat_frames, h, w)
    n = grid[0] * h * w + n_pose
    conds = {}
    if reference:
        conds["reference_latent"] = torch.zeros(1, 20, n_ref_frames, 10, 14)
    if concat_frames:
        conds["time_dim_concat"] = torch.zeros(1, 16, concat_frames, 10, 14)
    return {"img": torch.zeros(2, n, 8), "pe": torch.zeros(1, n, 1, 4, 2, 2),
            "transformer_options": {"grid_sizes": grid, CONDS_KEY: conds}}


def test_scail_image_tokens_sit_between_the_reference_frames_and_the_pose_tokens():
    family = scail_family("SCAIL", 1)
    n_img = 3 * 5 * 7
    span = image_span(family.blocks[0], scail_call(2, 3, n_pose=30), n_img, 0, family)
    assert (span.img_start, span.n_img, span.pe_dim) == (2 * 35, n_img, 1)
    # time-concatenated frames follow the video; without a reference the video starts the sequence
    span = image_span(family.blocks[0], scail_call(0, 3, n_pose=0, concat_frames=1, reference=False), n_img, 0, family)
    assert span.img_start == 0


def test_scail_calls_that_do_not_add_up_run_unreduced_with_the_reason():
    family = scail_family("SCAIL", 1)
    call = scail_call(1, 3, n_pose=12)
    call["transformer_options"][CONDS_KEY] = {}  # the grid has a reference frame the conditioning does not show
    why = image_span(family.blocks[0], call, 3 * 35, 0, family)
    assert isinstance(why, str) and "reference" in why
    call = scail_call(1, 3, n_pose=12)
    del call["transformer_options"]["grid_sizes"]
    assert "grid_sizes" in image_span(family.blocks[0], call, 3 * 35, 0, family)
