"""In-memory token-map snapshots and the HTTP routes the web extension reads.

Only ids issued here are served (never a file path); a bad parameter gets a 4xx with a JSON reason.
  GET /token_reduction/maps/{id}                        -> metadata, stats, thumbnail
  GET /token_reduction/maps/{id}/map?kind=&step=&block= -> one map as a flat list of floats
  GET /token_reduction/schedule?preset=&ratio=&...       -> the schedule node's graph (handle_schedule)
  GET /token_reduction/presets                          -> the patch nodes' presets (patch_node.preset_widgets)
"""
from __future__ import annotations

import base64
import re
import secrets
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ..kernels.maps import KIND_HELP, KINDS, NOT_RECORDED

ROUTE = "/token_reduction/maps"
MAX_SNAPSHOTS = 16
THUMB = 256
_ID = re.compile(r"^[0-9a-f]{16}$")
_INT = re.compile(r"^-?[0-9]{1,6}$")

_snapshots: "OrderedDict[str, dict]" = OrderedDict()


def issue(store, image: torch.Tensor | None, stats: str) -> str:
    """Register a snapshot of `store` (its maps of the last run) and return its new id."""
    map_id = secrets.token_hex(8)
    thumb = _thumbnail(image) if image is not None else None
    _snapshots[map_id] = {"store": store.snapshot(), "thumb": thumb, "stats": stats}
    while len(_snapshots) > MAX_SNAPSHOTS:
        _snapshots.popitem(last=False)
    return map_id


def lookup(map_id: str):
    return _snapshots.get(map_id) if isinstance(map_id, str) and _ID.match(map_id) else None


def _thumbnail(image: torch.Tensor) -> dict:
    img = image[0] if image.ndim == 4 else image
    h, w = img.shape[:2]
    s = min(1.0, THUMB / max(h, w))
    th, tw = max(1, round(h * s)), max(1, round(w * s))
    small = F.interpolate(img[..., :3].float().cpu().permute(2, 0, 1).unsqueeze(0), size=(th, tw),
                          mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    data = (small.clamp(0, 1) * 255).round().to(torch.uint8).contiguous().numpy().tobytes()
    return {"width": tw, "height": th, "rgb_base64": base64.b64encode(data).decode("ascii")}


def meta(map_id: str, entry: dict) -> dict:
    store = entry["store"]
    recorded = {kind: [list(p) for p in store.recorded(kind)] for kind in KINDS}
    return {
        "id": map_id, "grid": list(store.grid), "steps": store.n_steps,
        "blocks": ["%s %d" % spec.key for spec in store.family.blocks],
        "kinds": list(KINDS), "kind_help": KIND_HELP, "not_recorded": NOT_RECORDED, "recorded": recorded,
        "progress": [store.progress.get(s) for s in range(store.n_steps)],
        "image": entry["thumb"], "stats": entry["stats"], "refused": store.refused,
    }


def _bad(status: int, reason: str):
    from aiohttp import web
    return web.json_response({"error": reason}, status=status)


async def handle_meta(request):
    from aiohttp import web
    map_id = request.match_info.get("map_id", "")
    if not _ID.match(map_id):
        return _bad(400, "malformed map id")
    if set(request.query):
        return _bad(400, "this endpoint takes no query parameters")
    entry = lookup(map_id)
    if entry is None:
        return _bad(404, "unknown map id (maps are kept in memory for the latest overlays only)")
    return web.json_response(meta(map_id, entry))


async def handle_map(request):
    from aiohttp import web
    map_id = request.match_info.get("map_id", "")
    if not _ID.match(map_id):
        return _bad(400, "malformed map id")
    q = request.query
    extra = set(q) - {"kind", "step", "block"}
    if extra or len(q) != len(set(q)):
        return _bad(400, "unexpected or repeated query parameters")
    kind = q.get("kind", "")
    if kind not in KINDS:
        return _bad(400, f"kind must be one of {', '.join(KINDS)}")
    for name in ("step", "block"):
        if not _INT.match(q.get(name, "")):
            return _bad(400, f"{name} must be an integer")
    entry = lookup(map_id)
    if entry is None:
        return _bad(404, "unknown map id")
    store = entry["store"]
    step, block = int(q["step"]), int(q["block"])
    if not 0 <= step < store.n_steps:
        return _bad(400, f"step must lie in [0, {store.n_steps - 1}]")
    if not 0 <= block < store.family.num_blocks:
        return _bad(400, f"block must lie in [0, {store.family.num_blocks - 1}]")
    values = store.map(kind, step, block)
    if values is None:  # a valid question with an empty answer, not an error
        return web.json_response({"kind": kind, "step": step, "block": block, "grid": list(store.grid),
                                  "values": None, "reason": NOT_RECORDED[kind]})
    v = values.float()
    return web.json_response({"kind": kind, "step": step, "block": block, "grid": list(store.grid),
                              "min": float(v.min()), "max": float(v.max()),
                              "values": [round(x, 5) for x in v.tolist()]})


SCHEDULE_ROUTE = "/token_reduction/schedule"
SCHEDULE_GRID = 33
_SCHEDULE_FLOATS = {"ratio": (0.0, 1.0), "end_scale": (0.0, 1.0), "switch_percent": (0.0, 1.0)}
_SCHEDULE_TEXTS = ("progress_curve", "depth_curve", "schedule_json")
_FLOAT = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,20})?$")


async def handle_schedule(request):
    """The schedule the node would build from these widget values, on a grid, and its unused widgets
    (calibrate=1: a model is connected, so no schedule)."""
    from aiohttp import web
    from ..kernels.schedule_presets import PRESETS, build_schedule
    from .schedule_node import unused_widgets
    q = request.query
    allowed = {"preset", "calibrate", *_SCHEDULE_FLOATS, *_SCHEDULE_TEXTS}
    if set(q) - allowed or len(q) != len(set(q)):
        return _bad(400, "unexpected or repeated query parameters")
    preset = q.get("preset", "constant")
    if preset not in PRESETS:
        return _bad(400, f"preset must be one of {', '.join(PRESETS)}")
    if q.get("calibrate", "0") not in ("0", "1"):
        return _bad(400, "calibrate must be 0 or 1")
    values = {}
    for name, (lo, hi) in _SCHEDULE_FLOATS.items():
        text = q.get(name, "")
        if not text or not _FLOAT.match(text) or not lo <= float(text) <= hi:
            return _bad(400, f"{name} must be a number in [{lo}, {hi}]")
        values[name] = float(text)
    texts = {name: q.get(name, "") for name in _SCHEDULE_TEXTS}
    if any(len(t) > 4000 for t in texts.values()):
        return _bad(400, "curve or JSON text too long (4000 characters at most)")
    calibrate = q.get("calibrate") == "1" and not texts["schedule_json"].strip()
    unused = unused_widgets(preset, texts["progress_curve"], texts["depth_curve"], texts["schedule_json"], calibrate)
    if calibrate:
        return web.json_response({"name": "calibrated", "calibrate": True, "unused": unused})
    try:
        schedule = build_schedule(preset, values["ratio"], values["end_scale"], values["switch_percent"],
                                  texts["progress_curve"], texts["depth_curve"], texts["schedule_json"])
    except ValueError as e:
        return _bad(400, str(e)[:300])
    axis = [i / (SCHEDULE_GRID - 1) for i in range(SCHEDULE_GRID)]
    ratios = [[round(schedule.ratio(d, p), 5) for p in axis] for d in axis]
    return web.json_response({"name": schedule.name, "calibrate": False, "unused": unused, "depth": axis,
                              "progress": axis, "ratios": ratios})


PRESETS_ROUTE = "/token_reduction/presets"


async def handle_presets(request):
    """The patch nodes' presets as widget values, so the frontend can show what a preset runs."""
    from aiohttp import web
    from ..kernels.methods import SPECS
    from .patch_node import preset_widgets
    if set(request.query):
        return _bad(400, "this endpoint takes no query parameters")
    return web.json_response({spec.node_id: preset_widgets(spec) for spec in SPECS})


_registered = False


def register_routes() -> bool:
    """Add the routes to ComfyUI's running PromptServer, if there is one (not in plain imports)."""
    global _registered
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if _registered or instance is None:
        return _registered
    instance.routes.get(ROUTE + "/{map_id}")(handle_meta)
    instance.routes.get(ROUTE + "/{map_id}/map")(handle_map)
    instance.routes.get(SCHEDULE_ROUTE)(handle_schedule)
    instance.routes.get(PRESETS_ROUTE)(handle_presets)
    _registered = True
    return True
