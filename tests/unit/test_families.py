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


class PerFrame:
    """A stand-in for the host's CompressedTimestep: one row per frame of `per_frame` tokens."""

    def __init__(self, data, per_frame):
        self.data, self.patches_per_frame = data, per_frame


def test_ltx2_block_args_show_the_video_and_take_each_kept_tokens_own_entries():
    """The runners see LTX-2's video; a reduced call hands the block each kept token's own rotary entries and
    timesteps (per frame or per token), and the audio beside it."""
    family = families.ltxav_family("LTXAV", 1)
    frames, per_frame = 2, 3
    vx, ax = torch.randn(1, frames * per_frame, 4), torch.randn(1, 5, 4)
    per_token = torch.arange(frames * per_frame, dtype=torch.float32).view(1, -1, 1).expand(1, -1, 6)
    args = {"img": (vx, ax), "v_pe": (torch.arange(6.0).view(1, 6, 1, 1, 1, 1), True), "v_cross_pe": (vx, False),
            "v_timestep": PerFrame(torch.tensor([[[10.0], [20.0]]]), per_frame), "v_cross_scale_shift_timestep": per_token,
            "v_cross_gate_timestep": PerFrame(torch.ones(1, 1, 2), per_frame), "transformer_options": {}}
    seen = {}

    def host_block(a):
        seen.update(a)
        return {"img": a["img"]}

    view, block, back = block_view(family, args, host_block)
    assert view["img"] is vx and view["audio"] is ax and view["pe"].shape == (1, 6, 1)
    kept = torch.tensor([[1, 4]])  # one token of each frame, as a reduced call's positions come back
    out = block({**view, "img": vx[:, [1, 4]], "pe": view["pe"][:, [1, 4]]})
    assert seen["img"][1] is ax and seen["v_pe"][1] is True
    assert seen["v_pe"][0].flatten().tolist() == [1.0, 4.0]
    assert seen["v_timestep"].flatten().tolist() == [10.0, 20.0]
    assert torch.equal(seen["v_cross_scale_shift_timestep"], per_token[:, [1, 4]])
    assert seen["v_cross_gate_timestep"] is args["v_cross_gate_timestep"]  # one row for every token
    assert torch.equal(seen["v_cross_pe"][0], vx[0, kept[0]].unsqueeze(0))
    assert isinstance(back(out)["img"], tuple)


def test_ltx2_calls_with_a_guide_attention_mask_run_unreduced_with_the_reason():
    family = families.ltxav_family("LTXAV", 1)
    args = {"img": (torch.randn(1, 6, 4), torch.randn(1, 2, 4)), "self_attention_mask": object(),
            "transformer_options": {}}
    view, _, _ = block_view(family, args, lambda a: a)
    assert isinstance(view, str) and "guide" in view
