"""kernels/families.py: how families with their own block arguments and layouts are read, host-free."""
import torch

from kernels import families
from kernels.families import CONDS_KEY, BlockSpec, Renamed, block_view, image_span, scail_family


def test_renamed_block_args_reach_the_runners_and_go_back():
    """The runners see img/txt/vec/pe; the host's block gets its own names back, and so does its caller."""
    family = families.Family("K", (BlockSpec(("layer", 0), 0, False),), has_rope=False,
                             block_args=Renamed((("img", "x"), ("pe", "freqs"))))
    x, freqs = torch.randn(1, 6, 4), torch.randn(1, 6, 2)
    seen = {}

    def host_block(args):
        seen.update(args)
        return {"x": args["x"] * 2}

    view, block, back = block_view(family, {"x": x, "freqs": freqs, "transformer_options": {}}, host_block)
    assert view["img"] is x and view["pe"] is freqs and "x" not in view
    out = block({**view, "img": x[:, :3]})
    assert seen["x"].shape[1] == 3 and seen["freqs"] is freqs and "img" not in seen
    assert torch.equal(out["img"], x[:, :3] * 2)
    assert set(back(out)) == {"x"}


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
