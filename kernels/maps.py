"""Token maps: per-step, per-block records of what each image token went through, host-independent.

Redundancy maps (merge groups, computed masks) come from the runtime's observer (an ActiveCall);
attention maps from a probe on detached copies, so recording never changes the computation. A run whose
worst case (`estimate_bytes`) exceeds the budget records nothing.
"""
from __future__ import annotations

import contextvars
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention import get_mask, override_attention
from .families import Family, TextOrder, block_flops, block_tokens, block_view, image_span
from .runtime import chained, observe, stop_observing

KINDS = ("attention_text", "attention_image", "merge_size", "merge_groups", "computed")
KIND_HELP = {
    "attention_text": "attention each image token receives from the text (prompt) queries",
    "attention_image": "attention each image token receives from a sample of image queries",
    "merge_size": "size of the merge group each token belongs to (1 = computed on its own)",
    "merge_groups": "merge groups, one colour each; unmerged tokens stay clear",
    "computed": "share of its own computation each token got: 1 alone, 1/size merged, 0 pruned or cached",
}
_REDUNDANCY_WHERE = ("the Token Map Recorder keeps redundancy maps only at its steps and blocks, and only where a "
                     "method reported which tokens it merged, pruned or cached")
_ATTENTION_WHERE = "attention is recorded only at the Token Map Recorder's attention_steps and attention_blocks"
# Why a step and block may hold no map of a kind (the viewer says it).
NOT_RECORDED = {"attention_text": _ATTENTION_WHERE, "attention_image": _ATTENTION_WHERE,
                "merge_size": _REDUNDANCY_WHERE, "merge_groups": _REDUNDANCY_WHERE, "computed": _REDUNDANCY_WHERE}

log = logging.getLogger("token_reduction")

ATTN_BYTES = 4   # two float16 maps per (step, block)
MASK_BYTES = 1   # uint8 computed mask


def group_bytes(n_tokens: int) -> int:
    return 2 if n_tokens <= 32767 else 4


# ---- step / block selections ------------------------------------------------------------------

def parse_selection(text: str, n: int | None) -> list[int] | None:
    """Sorted indices of `n` items named by e.g. "all", "none", "first, middle, last", "0, 5..9, -1"
    (negative from the end, ranges inclusive); n None checks the syntax only and returns None."""
    text = (text or "").strip().lower()
    if not text:
        raise ValueError("empty selection: use 'all', 'none' or indices such as '0, 5..9, -1'")
    out: list[int] = []
    for item in (s.strip() for s in text.split(",")):
        if item == "all":
            out += list(range(n)) if n is not None else []
        elif item == "none":
            continue
        elif item in ("first", "middle", "last"):
            if n:
                out.append({"first": 0, "middle": n // 2, "last": n - 1}[item])
        elif ".." in item:
            a, b = (_int(s, text) for s in item.split("..", 1))
            if n is not None:
                a, b = _index(a, n, text), _index(b, n, text)
                out += list(range(a, b + 1))
        else:
            i = _int(item, text)
            if n is not None:
                out.append(_index(i, n, text))
    return None if n is None else sorted(set(out))


def _int(s: str, text: str) -> int:
    try:
        return int(s.strip())
    except ValueError:
        raise ValueError(f"selection {text!r}: {s.strip()!r} is not an index; use 'all', 'none', "
                         "'first', 'middle', 'last', integers (negative from the end) or 'a..b'") from None


def _index(i: int, n: int, text: str) -> int:
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise ValueError(f"selection {text!r}: index {i} is out of range for {n} items")
    return j


# ---- the store ----------------------------------------------------------------------------------

@dataclass
class RecorderConfig:
    steps: str = "all"                 # redundancy maps
    blocks: str = "all"
    attention_steps: str = "first, middle, last"
    attention_blocks: str = "first, middle, last"
    queries: int = 256                 # sampled image (and text) queries per attention map
    max_bytes: int = 256 * 2 ** 20


@dataclass
class BlockCount:
    n_img: int        # image tokens the block stands for
    n_computed: int   # image tokens it computed (after merging / pruning; 0 when skipped)
    n_other: int      # other tokens in its joint attention (text, reference images)
    width: int        # hidden size


@dataclass
class TokenMapStore:
    """Maps of the latest sampling run of one recorder; `run_id` changes every run."""

    config: RecorderConfig
    family: Family
    maps: dict = field(default_factory=dict)          # (kind, step, block) -> tensor (N,)
    counts: dict = field(default_factory=dict)        # (step, block) -> BlockCount
    progress: dict = field(default_factory=dict)      # step -> progress in [0, 1]
    grid: tuple = ()
    n_steps: int = 0
    run_id: int = 0
    refused: str | None = None
    truncated: bool = False
    bytes_used: int = 0
    seconds: float = 0.0
    _sigmas: list = field(default_factory=list)
    _sel: tuple = (set(), set(), set(), set())
    _t0: float = 0.0

    # -- run lifecycle --
    def begin_run(self, sigmas, grid: tuple):
        self.maps, self.counts, self.progress = {}, {}, {}
        self.grid = tuple(int(g) for g in grid)
        self._sigmas = [float(s) for s in sigmas]
        self.n_steps = max(len(self._sigmas) - 1, 0)
        self.run_id += 1
        self.refused, self.truncated, self.bytes_used = None, False, 0
        c, nb = self.config, self.family.num_blocks
        self._sel = (set(parse_selection(c.steps, self.n_steps)), set(parse_selection(c.blocks, nb)),
                     set(parse_selection(c.attention_steps, self.n_steps)),
                     set(parse_selection(c.attention_blocks, nb)))
        need = estimate_bytes(self.n_tokens, len(self._sel[0]), len(self._sel[1]),
                              len(self._sel[2]), len(self._sel[3]))
        if need > c.max_bytes:
            self.refused = budget_message(need, c.max_bytes, self.n_steps, nb, self.grid)
        self._t0 = time.perf_counter()

    def end_run(self):
        self.seconds = time.perf_counter() - self._t0
        self.maps = {k: v.cpu() for k, v in self.maps.items()}

    @property
    def n_tokens(self) -> int:
        return math.prod(self.grid) if self.grid else 0

    def step_of(self, sigma: float) -> int:
        sig = self._sigmas[:max(self.n_steps, 1)]
        return min(range(len(sig)), key=lambda i: abs(sig[i] - sigma)) if sig else 0

    # -- what to record --
    def wants_redundancy(self, step: int, block: int) -> bool:
        return self.refused is None and step in self._sel[0] and block in self._sel[1]

    def wants_attention(self, step: int, block: int) -> bool:
        return self.refused is None and step in self._sel[2] and block in self._sel[3]

    def put(self, kind: str, step: int, block: int, values: torch.Tensor):
        key = (kind, step, block)
        if key in self.maps:
            return
        size = values.numel() * values.element_size()
        if self.bytes_used + size > self.config.max_bytes:
            self.truncated = True
            return
        self.maps[key] = values
        self.bytes_used += size

    # -- reading --
    def __deepcopy__(self, memo):
        # ModelPatcher.clone deep-copies model_options: every clone must share this one store.
        return self

    def snapshot(self) -> "TokenMapStore":
        """A copy that keeps this run's maps when the next run starts (maps are not copied)."""
        return copy.copy(self)

    def has(self, kind: str, step: int, block: int) -> bool:
        if kind.startswith("attention"):
            return (kind, step, block) in self.maps
        if ("group", step, block) in self.maps or ("computed", step, block) in self.maps:
            return True
        count = self.counts.get((step, block))
        return count is not None and count.n_computed >= count.n_img

    def recorded(self, kind: str) -> list[tuple[int, int]]:
        """(step, block) pairs that hold a map of `kind`, in order."""
        pairs = {(s, b) for (_k, s, b) in self.maps} | set(self.counts)
        return sorted(p for p in pairs if self.has(kind, *p))

    def map(self, kind: str, step: int, block: int) -> torch.Tensor | None:
        """Float map (N,) of `kind` at (step, block), or None when nothing was recorded there."""
        if kind in ("attention_text", "attention_image"):
            m = self.maps.get((kind, step, block))
            return None if m is None else m.float()
        count = self.counts.get((step, block))
        groups = self.maps.get(("group", step, block))
        computed = self.maps.get(("computed", step, block))
        if groups is None and computed is None:
            # No per-token record: a full-density block, or a reduction nobody reported.
            if count is None or count.n_computed < count.n_img:
                return None
            return torch.zeros(self.n_tokens) if kind == "merge_groups" else torch.ones(self.n_tokens)
        n = self.n_tokens
        if groups is not None:
            g = groups.long()
            sizes = torch.bincount(g, minlength=int(g.max()) + 1).float()[g]
        else:
            g, sizes = torch.arange(n), torch.ones(n)
        if kind == "merge_size":
            return sizes
        if kind == "merge_groups":
            return torch.where(sizes > 1, g.float() + 1, torch.zeros_like(sizes))
        share = 1.0 / sizes
        return share if computed is None else share * computed.float()


def estimate_bytes(n_tokens: int, red_steps: int, red_blocks: int, attn_steps: int, attn_blocks: int) -> int:
    """Worst-case bytes of one run's maps: group map int16/int32, computed mask uint8, 2 float16 attention maps."""
    per_red = n_tokens * (group_bytes(n_tokens) + MASK_BYTES)
    return red_steps * red_blocks * per_red + attn_steps * attn_blocks * n_tokens * ATTN_BYTES


def budget_message(need: int, budget: int, n_steps: int, n_blocks: int, grid: tuple) -> str:
    return (f"Token Map Recorder: recording would need up to {need / 2 ** 20:.1f} MiB for {n_steps} steps x "
            f"{n_blocks} blocks on a {'x'.join(map(str, grid))} token grid, above the budget of "
            f"{budget / 2 ** 20:.1f} MiB; this run records no maps. Select fewer steps or blocks, or "
            "raise max_megabytes.")


# ---- the per-call context that methods feed -----------------------------------------------------

@dataclass
class ActiveCall:
    store: TokenMapStore
    step: int
    row: int                 # batch row recorded (the first conditional row)
    n_img: int
    n_txt: int
    plans: dict = field(default_factory=dict)      # block -> (assign row, n_out)
    computed: dict = field(default_factory=dict)   # block -> mask row
    txt_stream: torch.Tensor | None = None         # families.TextOrder's per-call state
    text_first: bool | str | None = None
    pending: dict = field(default_factory=dict)    # (text first?, kind, step, block) -> map, until the order shows

    # -- the runtime's observer interface --
    def plan(self, block: int, plan):
        if plan.assign.shape[0] <= self.row:
            return
        assign = plan.assign[self.row].detach()
        self.plans[block] = (assign, plan.n_out)
        if self.store.wants_redundancy(self.step, block):
            dtype = torch.int16 if group_bytes(plan.n_in) == 2 else torch.int32
            self.store.put("group", self.step, block, assign.to(dtype))

    def computed_mask(self, block: int, values: torch.Tensor):
        if values.shape[0] <= self.row:
            return
        row = values[self.row].detach()
        self.computed[block] = row
        if self.store.wants_redundancy(self.step, block):
            self.store.put("computed", self.step, block, row.to(torch.uint8))


_ACTIVE: contextvars.ContextVar[ActiveCall | None] = contextvars.ContextVar("token_map_call", default=None)


def activate(call: ActiveCall):
    """Make `call` the recorder's current model call and the runtime's observer; returns a token."""
    return _ACTIVE.set(call), observe(call)


def deactivate(tokens):
    _ACTIVE.reset(tokens[0])
    stop_observing(tokens[1])


# ---- block replacements that count tokens and probe attention -----------------------------------

def recorder_block_replaces(family: Family, existing: dict | None = None) -> dict:
    """{block key: replace} that record token counts and attention; `existing` runs beneath."""
    existing = existing or {}
    text_order = TextOrder(family)
    return {spec.key: _recorder_replace(spec, family, existing.get(spec.key), text_order) for spec in family.blocks}


def _recorder_replace(spec, family, previous, text_order):
    def replace(host_args, extra):
        original = extra["original_block"]
        call = _ACTIVE.get()
        if call is None:
            return chained(original, previous)(host_args)
        seen = {"n": 0}

        def counting(a):  # the host's own block, beneath any method that reduced its tokens
            seen["n"] = block_tokens(family, a)
            return original(a)

        args, run_block, back = block_view(family, host_args, chained(counting, previous))
        if not isinstance(args, dict):
            return chained(original, previous)(host_args)
        return back(record(args, run_block, call, seen))

    def record(args, run_block, call, seen):
        if not spec.text_in_img and args.get("txt") is not None:
            call.n_txt = args["txt"].shape[1]
        text_first = text_order.of(spec, args, call)
        if call.pending and text_first is not None:  # the order is verified (or not): keep the right maps
            for (order, kind, step, block), m in call.pending.items():
                if order is text_first:
                    call.store.put(kind, step, block, m)
            call.pending.clear()
        # Until this call shows the text order, a double block is probed for both; its counts do not depend on it.
        orders = (True, False) if text_first is None else (text_first,)
        spans = {} if isinstance(text_first, str) else \
            {order: image_span(spec, args, call.n_img, call.n_txt, family, order) for order in orders}
        if not spans or any(s is None or isinstance(s, str) for s in spans.values()):
            out = run_block(args)
            text_order.block_done(spec, out, call)
            return out
        span = spans[orders[0]]
        store, step, block = call.store, call.step, spec.index
        full_len = args["img"].shape[1]

        new_args = args
        if store.wants_attention(step, block) and (("attention_image", step, block) not in store.maps):
            new_args = dict(args)
            to = args.get("transformer_options") or {}
            for order, s in spans.items():
                put = store.put if text_first is not None else \
                    (lambda kind, st, bl, m, order=order: call.pending.setdefault((order, kind, st, bl), m))
                to = override_attention(to, _attention_probe(call, block, s, s.n_txt + full_len + s.n_txt_after, put))
            new_args["transformer_options"] = to
        out = run_block(new_args)
        text_order.block_done(spec, out, call)
        if (step, block) not in store.counts and store.refused is None:
            n_comp = max(span.n_img - (full_len - seen["n"]), 0) if seen["n"] else 0
            store.counts[(step, block)] = BlockCount(span.n_img, n_comp, full_len - span.n_img + span.n_txt + span.n_txt_after,
                                                     int(args["img"].shape[-1]))
        return out

    return replace


def _attention_probe(call: ActiveCall, block: int, span, full_len: int, put: Callable):
    """An attention hook that records, through `put(kind, step, block, map)`, the attention the image keys
    receive (once per block call)."""
    done = {"v": False}

    def probe(ordinal, args, kwargs):
        if not done["v"]:
            try:
                done["v"] = _probe(call, block, span.key_offset, span, full_len, args, kwargs, put)
            except Exception as e:  # a map is never worth a failed generation
                done["v"] = True
                log.warning("Token Map Recorder: attention map of block %d skipped: %s: %s", block,
                            type(e).__name__, e)
        return args, kwargs

    return probe


def _probe(call, block, offset, span, full_len, args, kwargs, put) -> bool:
    n_img = span.n_img
    q, k = args[0], args[1]
    heads = args[3] if len(args) > 3 else kwargs.get("heads")
    if kwargs.get("skip_reshape"):
        qh, kh = q[call.row], k[call.row]                      # (H, L, D)
    else:
        if heads is None or q.ndim != 3:
            return False
        b, L, hd = q.shape
        qh = q[call.row].reshape(L, heads, hd // heads).transpose(0, 1)
        kh = k[call.row].reshape(k.shape[1], heads, hd // heads).transpose(0, 1)
    L = kh.shape[1]
    plan, comp = call.plans.get(block), call.computed.get(block)
    if L == full_len:
        n_keys, expand = n_img, None                             # unreduced
    elif plan is not None and L == full_len - (n_img - plan[1]):
        n_keys, expand = plan[1], ("plan", plan[0])
    elif comp is not None and L == full_len - (n_img - int(comp.sum())):
        n_keys, expand = L - (full_len - n_img), ("mask", comp)
    else:
        return False  # another attention of the block (e.g. SD3.5's image-only one), or unknown
    mask = get_mask(args, kwargs)
    # CAT runs only its selected image tokens as queries against every key.
    n_q_img = qh.shape[1] - (L - n_keys)
    if n_q_img <= 0 or qh.shape[1] < offset:
        return False
    img_q = offset + _strided(n_q_img, call.store.config.queries, q.device)
    with torch.no_grad():
        maps = {"attention_image": _received(qh, kh, img_q, mask, call.row, offset, n_keys)}
        # Text queries come before the image, after it (HunyuanVideo), or not at all (cross-attention).
        n_after = qh.shape[1] - (offset + n_q_img)
        text_q = None
        if span.cross_attention:
            pass
        elif span.text_first and offset > 0:
            text_q = _strided(offset, call.store.config.queries, q.device)
        elif not span.text_first and n_after > 0:
            text_q = offset + n_q_img + _strided(n_after, call.store.config.queries, q.device)
        if text_q is not None:
            maps["attention_text"] = _received(qh, kh, text_q, mask, call.row, offset, n_keys)
    for name, m in maps.items():
        if expand is not None and expand[0] == "plan":
            assign = expand[1].long()
            sizes = torch.bincount(assign, minlength=n_keys).clamp_min(1).to(m.dtype)
            m = (m / sizes)[assign]
        elif expand is not None:
            full = torch.zeros(n_img, device=q.device, dtype=m.dtype)
            full[expand[1].bool()] = m
            m = full
        put(name, call.step, block, m.to(torch.float16))
    return True


def _strided(n: int, k: int, device) -> torch.Tensor:
    if n <= k:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, k, device=device).round().long()


def _received(qh, kh, qidx, mask, row, offset, n_keys, head_chunk: int = 4) -> torch.Tensor:
    """Mean over the queries `qidx` of the softmax attention on keys [offset, offset + n_keys)."""
    h, _, d = qh.shape
    acc = torch.zeros(n_keys, device=qh.device, dtype=torch.float32)
    m = _mask_rows(mask, row, qidx) if mask is not None else None
    for h0 in range(0, h, head_chunk):
        s = qh[h0:h0 + head_chunk, qidx].float() @ kh[h0:h0 + head_chunk].float().transpose(1, 2)
        s = s / math.sqrt(d)
        if m is not None:
            s = s + (m if m.shape[0] == 1 else m[h0:h0 + head_chunk])
        p = s.softmax(-1)
        acc += p[:, :, offset:offset + n_keys].sum((0, 1))
    return acc / (h * len(qidx))


def _mask_rows(mask, row, qidx):
    """(1 or H, Q, L) additive float mask for batch row `row` and the sampled queries."""
    m = mask
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.ndim == 3:
        m = m.unsqueeze(1)
    m = m[min(row, m.shape[0] - 1)]
    if m.shape[1] > 1:
        m = m[:, qidx]
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))
    return m.float()


# ---- FLOPs estimate -------------------------------------------------------------------------------

def run_summary(store: TokenMapStore) -> tuple[str, list[str]]:
    """One summary line and one line per step: tokens computed, reduced, estimated FLOPs saved."""
    if store.refused:
        return store.refused, []
    per_step: dict = {}
    for (step, _block), c in store.counts.items():
        a = per_step.setdefault(step, [0, 0, 0.0, 0.0, 0, 0])
        a[0] += c.n_img
        a[1] += c.n_computed
        a[2] += block_flops(c.n_img + c.n_other, c.width)
        a[3] += block_flops(c.n_computed + c.n_other, c.width)
    for (kind, step, _block), m in store.maps.items():
        if step in per_step and kind == "group":
            per_step[step][4] += m.numel() - (int(m.max()) + 1)
        elif step in per_step and kind == "computed":
            per_step[step][5] += int(m.numel() - m.long().sum())
    if not per_step:
        return "Token maps: no block was recorded in the last run", []
    lines = []
    for step in sorted(per_step):
        n, comp, f_full, f_done, merged, skipped = per_step[step]
        lines.append(f"step {step + 1}/{store.n_steps} (progress {store.progress.get(step, float('nan')):.2f}): "
                     f"computed {100 * comp / max(n, 1):.1f}% of image tokens, merged {merged}, "
                     f"pruned/cached {skipped}, est. FLOPs saved {100 * (1 - f_done / max(f_full, 1)):.1f}%")
    tot = [sum(v[i] for v in per_step.values()) for i in range(4)]
    spp = store.seconds / max(len(per_step), 1)
    head = (f"Token maps, last run: tokens saved {100 * (1 - tot[1] / max(tot[0], 1)):.1f}%, "
            f"FLOPs saved {100 * (1 - tot[3] / max(tot[2], 1)):.1f}% (estimated), {spp:.3f} s/step over "
            f"{len(per_step)} steps, {len(store.maps)} maps, {store.bytes_used / 2 ** 20:.2f} MiB"
            + (" (budget reached: later maps dropped)" if store.truncated else ""))
    return head, lines
