"""kernels/families.py: the text order and the per-range modulation read from the calls, host-free.

The host tests (tests/host/test_host_image_tokens.py) check the same against ComfyUI's own models; these
drive kernels.runtime with hand-made block calls, so each rule is seen on its own.
"""
import logging

import pytest
import torch

from kernels import families
from kernels.families import TextOrder, flux_family, image_span, modulation_mismatch, nextdit_family, shift_ranges
from kernels.attention import ATTENTION_OVERRIDE_KEY
from kernels.runtime import CALL_KEY, Runtime, TokenMethod

N_TXT, N_IMG, C = 4, 16, 8
FLUX = flux_family("Flux", 1, 1)


class Recorder(TokenMethod):
    """Records the span of every block call it is given and runs the block unchanged."""

    name = "recorder"

    def __init__(self):
        self.spans = []

    def run_block(self, block):
        self.spans.append((block.spec.key, block.span))
        return block.original(block.args)


def _joint_block(text_first: bool):
    """A double block of a host whose joint attention puts the text first or last (queries as keys)."""
    def block(a):
        seq = torch.cat([a["txt"], a["img"]] if text_first else [a["img"], a["txt"]], 1)
        attention = lambda q, k, v, heads, **kw: q  # noqa: E731
        override = (a.get("transformer_options") or {}).get(ATTENTION_OVERRIDE_KEY)
        override(attention, seq, seq, seq, 1) if override else attention(seq, seq, seq, 1)
        return {"img": a["img"], "txt": a["txt"]}
    return block


def _double_then_single(rt, to, text_first: bool, tamper: bool = False, single_text_first: bool | None = None):
    """One model call of a Flux-like host: a double block, then a single block over the joined streams (in
    `single_text_first` order: by default the double block's)."""
    g = torch.Generator().manual_seed(0)
    call_to = dict(to)
    rt.begin_call(call_to, torch.zeros(1, 16, 8, 8), 0.5, 0.5, N_TXT)
    img, txt = torch.randn(1, N_IMG, C, generator=g), torch.randn(1, N_TXT, C, generator=g)
    pe = torch.randn(1, 1, N_TXT + N_IMG, 2, 2, 2, generator=g)
    replaces = rt.block_replaces()
    out = replaces[("double_block", 0)]({"img": img, "txt": txt, "vec": torch.zeros(1, C), "pe": pe,
                                         "transformer_options": call_to}, {"original_block": _joint_block(text_first)})
    streams = [out["txt"] + tamper, out["img"]]
    seq = torch.cat(streams if (text_first if single_text_first is None else single_text_first) else streams[::-1], 1)
    replaces[("single_block", 0)]({"img": seq, "vec": torch.zeros(1, C), "pe": pe, "transformer_options": call_to},
                                  {"original_block": lambda a: {"img": a["img"]}})
    return call_to[CALL_KEY]


@pytest.mark.parametrize("text_first", [True, False])
def test_the_text_order_is_read_from_the_hosts_own_blocks(text_first):
    """The double block's order comes from the host's block (probe_text_first, from the first call on), the
    single block's from its sequence, in every call."""
    method = Recorder()
    rt = Runtime(method, FLUX, 2, "k")
    to = {}
    rt.start_run(to)
    for _ in range(2):
        method.spans.clear()
        _double_then_single(rt, to, text_first)
        spans = dict(method.spans)
        double, single = spans[("double_block", 0)], spans[("single_block", 0)]
        assert (double.n_txt, double.n_txt_after) == ((N_TXT, 0) if text_first else (0, N_TXT))
        assert double.key_offset == (N_TXT if text_first else 0)
        assert single.img_start == (N_TXT if text_first else 0) and single.text_first is text_first


def test_single_blocks_that_disagree_with_the_double_blocks_run_unreduced():
    method = Recorder()
    rt = Runtime(method, FLUX, 2, "k")
    to = {}
    rt.start_run(to)
    call = _double_then_single(rt, to, True, single_text_first=False)
    assert [key for key, _ in method.spans] == [("double_block", 0)]
    assert "elsewhere" in call.text_first
    assert isinstance(rt.text_order.known[(N_TXT, N_TXT + N_IMG)], str), "later calls' double blocks run whole"


def test_a_single_block_without_the_text_stream_at_an_end_runs_unreduced_with_one_warning(caplog):
    method = Recorder()
    rt = Runtime(method, FLUX, 2, "k")
    to = {}
    rt.start_run(to)
    with caplog.at_level(logging.WARNING, logger="token_reduction"):
        for _ in range(3):
            call = _double_then_single(rt, to, True, tamper=True)
    assert [key for key, _ in method.spans] == [("double_block", 0)], "the single block may not be reduced"
    assert "neither end" in call.text_first
    warnings = [r.getMessage() for r in caplog.records if "not recognised" in r.getMessage()]
    assert len(warnings) == 1 and "text stream" in warnings[0], warnings


def test_single_stream_order_needs_the_exact_text_stream():
    g = torch.Generator().manual_seed(1)
    txt, img = torch.randn(2, 3, C, generator=g), torch.randn(2, 9, C, generator=g)
    assert families.single_stream_text_first(torch.cat([txt, img], 1), txt, 3) is True
    assert families.single_stream_text_first(torch.cat([img, txt], 1), txt, 3) is False
    assert isinstance(families.single_stream_text_first(torch.cat([img, txt], 1), txt + 1e-6, 3), str)
    assert isinstance(families.single_stream_text_first(torch.cat([img, txt], 1), None, 3), str)
    assert families.single_stream_text_first(img, None, 0) is True, "no text: nothing to order"


def test_a_family_of_a_fixed_layout_never_waits():
    order = TextOrder(flux_family("reference", 1, 1, text_order_from_calls=False))
    assert order.of(FLUX.blocks[0], {"img": torch.zeros(1, 4, 2), "txt": torch.zeros(1, 2, 2)}, None) is True


# ---- per-range modulation ---------------------------------------------------------------------------

def _nextdit_args(ranges):
    """A NextDiT layer call: [caption 8, reference 6, image 16] with `timestep_zero_index` ranges."""
    return {"img": torch.randn(1, 30, C), "x_mask": None, "pe": torch.randn(1, 30, 1, 2, 2, 2),
            "vec": torch.randn(2, C), "timestep_zero_index": ranges}


def test_named_ranges_outside_the_image_keep_the_call_reduced_and_follow_it_back():
    fam = nextdit_family("NextDiT", 1)
    args = _nextdit_args([(14, 30), (0, 8)])  # the image range and the caption get the real timestep
    span = image_span(fam.blocks[0], args, N_IMG, 0, fam)
    assert not isinstance(span, str) and span.img_start == 14
    reduced = dict(args, img=args["img"][:, :22])  # 8 of the 16 image tokens left
    assert shift_ranges(args, reduced, span.img_start + N_IMG, 8)["timestep_zero_index"] == [(14, 22), (0, 8)]


def test_a_range_that_splits_the_image_tokens_runs_unreduced():
    fam = nextdit_family("NextDiT", 1)
    why = image_span(fam.blocks[0], _nextdit_args([(20, 30)]), N_IMG, 0, fam)
    assert isinstance(why, str) and "timestep_zero_index" in why


def test_ranges_the_block_does_not_name_are_caught_from_the_modulation():
    img = torch.zeros(2, N_IMG, C)
    # Qwen-Image-Edit 2511: the modulation carries a second set of rows for the reference tokens
    assert "more rows" in modulation_mismatch({"img": img, "vec": torch.zeros(4, C)}, FLUX, 0, N_IMG)
    # Flux's index_timestep_zero: ModulationOut-like tensors with a range axis of 2
    ranged = (torch.zeros(2, 2, C), torch.zeros(2, 2, C))
    assert "range axis" in modulation_mismatch({"img": img, "vec": (ranged, ranged)}, FLUX, 0, N_IMG)
    plain = (torch.zeros(2, 1, C), torch.zeros(2, 1, C))
    assert modulation_mismatch({"img": img, "vec": (plain, plain)}, FLUX, 0, N_IMG) is None


def test_a_reduced_block_gets_ranges_that_point_at_the_same_tokens():
    """Through the runtime: the block the method calls on fewer image tokens sees the reference range moved."""
    from kernels.sdtm import EVERY_STEP_MERGED, SDTM, SDTMConfig
    fam = nextdit_family("NextDiT", 1)
    rt = Runtime(SDTM(SDTMConfig(**{**EVERY_STEP_MERGED, "start_percent": 0.0, "ratio": 0.5, "deviation": 0.0})),
                 fam, 2, "k")
    to = {}
    rt.start_run(to)
    call_to = dict(to)
    rt.begin_call(call_to, torch.zeros(1, 16, 8, 8), 0.5, 0.5, 0)
    seen = []

    def layer(a):
        seen.append((a["img"].shape[1], a["timestep_zero_index"]))
        return {"img": a["img"]}

    args = dict(_nextdit_args([(0, 14), (30, 30)]), vec=torch.randn(1, C), transformer_options=call_to)
    rt.block_replaces()[("layer", 0)](args, {"original_block": layer})
    (length, ranges), = seen
    assert length < 30 and ranges == [(0, 14), (length, length)]


def test_a_double_block_whose_attention_cannot_be_seen_runs_unreduced():
    """probe_text_first needs the block's joint attention through the host's override: without it, unverified."""
    args = {"img": torch.randn(1, N_IMG, C), "txt": torch.randn(1, N_TXT, C), "vec": torch.zeros(1, C),
            "pe": torch.randn(1, 1, N_TXT + N_IMG, 2, 2, 2), "transformer_options": {}}
    assert families.probe_text_first(args, _joint_block(True), FLUX) is True
    assert families.probe_text_first(args, _joint_block(False), FLUX) is False
    why = families.probe_text_first(args, lambda a: {"img": a["img"], "txt": a["txt"]}, FLUX)
    assert isinstance(why, str) and "could not be observed" in why

    def fails(a):
        raise RuntimeError("shapes do not match")

    why = families.probe_text_first(args, fails, FLUX)
    assert isinstance(why, str) and "could not be probed" in why and "shapes do not match" in why
