"""The two ways a method runs a block on fewer image tokens, side by side: merged (SDTM, density) and
pruned with cached keys and values (CAT).
"""
from __future__ import annotations

from typing import Callable

import torch

from .attention import key_bias_hook, override_attention, size_weighted_hook
from .families import Family, ImageSpan, join_tokens, per_token_vec, split_tokens, with_image_pe
from .kv_cache import cached_kv_hook, store_kv
from .token_ops import MergePlan, scatter_index, take_rows


def run_block_merged(args: dict, original_block: Callable, plan: MergePlan, span: ImageSpan,
                     family: Family, key_bias: torch.Tensor | None = None, shared=None, pieces=None,
                     key_weights: torch.Tensor | None = None) -> dict:
    """Run a block on merged image tokens and restore full density: X + Unmerge(F(Merge X) - Merge X).

    A group takes its representative's rotary position. Proportional attention: `key_bias` (B, M) as a
    mask, or `key_weights` (B, M) without one (attention.size_weighted_hook).
    """
    x = args["img"]
    a = span.img_start
    before, main, after = pieces if pieces is not None else split_tokens(x, a, span.n_img)
    merged = plan.merge(main)
    new_args = dict(args)
    joined = join_tokens(before, merged, after)
    # Hosts update the block input in place (Flux: img += ...); merged is needed after the block.
    new_args["img"] = merged.clone() if joined is merged else joined
    if span.pe_dim is not None:
        pe = args["pe"]

        def merged_pe():
            return with_image_pe(pe, span, family, x.shape[0], lambda t: plan.take_rep(t, dim=span.pe_dim), shared)

        new_args["pe"] = merged_pe() if shared is None else shared.get(("merged pe", span.pe_dim, span.key_offset),
                                                                          (pe, plan), merged_pe)
    mask = args.get(family.key_mask_arg) if family.key_mask_arg else None
    if isinstance(mask, torch.Tensor):  # a per-key mask (HunyuanVideo's text mask): merged keys take their rep's
        k0 = span.key_offset
        mask = mask.expand(x.shape[0], *mask.shape[1:]) if mask.shape[0] != x.shape[0] else mask
        new_args[family.key_mask_arg] = torch.cat(
            [mask[..., :k0], plan.take_rep(mask[..., k0:k0 + span.n_img], dim=mask.ndim - 1),
             mask[..., k0 + span.n_img:]], dim=-1)
    vec = args.get("vec")
    if per_token_vec(vec, x):  # merged tokens take their group's mean modulation
        img_vec = vec[:, a:a + span.n_img]
        merged_vec = plan.merge(img_vec.flatten(2)).unflatten(2, img_vec.shape[2:])
        new_args["vec"] = torch.cat([vec[:, :a], merged_vec, vec[:, a + span.n_img:]], dim=1)
    hook = (key_bias_hook(key_bias, span.key_offset, plan.n_out, shared) if key_bias is not None else
            size_weighted_hook(key_weights, span.key_offset, plan.n_out, shared) if key_weights is not None else None)
    if hook is not None:
        new_args["transformer_options"] = override_attention(args.get("transformer_options") or {}, hook,
                                                             first_call_only=span.cross_attention)
    out = original_block(new_args)
    y_before, y_merged, y_after = split_tokens(out["img"], a, plan.n_out)
    out = dict(out)
    out["img"] = join_tokens(y_before, main + plan.unmerge(y_merged - merged), y_after)
    return out


def run_block_pruned(args: dict, original_block, span, family, selection: torch.Tensor | None,
                     kv_store: dict, shared=None, pieces=None, fp8: bool = False) -> dict:
    """Run a block on a subset of image tokens, with cached keys/values for the others.

    selection None: every token runs and refills `kv_store` ({call ordinal: {"k", "v", "start"}}).
    selection (B, k): only those image tokens (and every text token) run, against every image key;
    the others leave the block unchanged. `fp8`: the store holds float8 keys/values.
    """
    x = args["img"]
    a = span.img_start
    new_args = dict(args)
    if selection is not None:
        bsz, k = selection.shape
        before, main, after = pieces if pieces is not None else split_tokens(x, a, span.n_img)
        new_args["img"] = join_tokens(before, take_rows(main, selection, 1), after)
        if span.pe_dim is not None:
            pe, d = args["pe"], span.pe_dim

            def selected_pe():
                return with_image_pe(pe, span, family, bsz, lambda t: take_rows(t, selection, d), shared)

            new_args["pe"] = selected_pe() if shared is None else shared.get(("selected pe", d, span.key_offset),
                                                                              (pe, selection), selected_pe)
        vec = args.get("vec")
        if per_token_vec(vec, x):  # the selected tokens keep their own modulation
            new_args["vec"] = torch.cat([vec[:, :a], take_rows(vec[:, a:a + span.n_img], selection, 1),
                                         vec[:, a + span.n_img:]], dim=1)
    captured: list = []
    new_args["transformer_options"] = override_attention(
        args.get("transformer_options") or {},
        cached_kv_hook(kv_store, span.key_offset, span.n_img, selection, shared, captured, fp8),
        first_call_only=span.cross_attention)
    out = original_block(new_args)
    if selection is None:
        store_kv(kv_store, captured, fp8)
        return out
    y_before, y_sel, y_after = split_tokens(out["img"], a, k)
    idx = scatter_index(shared, selection, 1, (bsz, k, main.shape[2]))
    out = dict(out)
    out["img"] = join_tokens(y_before, main.scatter(1, idx, y_sel if y_sel.dtype == main.dtype else
                                                    y_sel.to(main.dtype)), y_after)
    return out
