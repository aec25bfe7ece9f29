"""The one patch-node base: a MethodSpec (kernels/method_spec.py) becomes a V3 node, MODEL in, patched MODEL out.

The spec gives the node its id, title, description, preset choice, expert inputs (their types and defaults
from the method's config), the optional schedule input, config() and execute(); nodes/__init__.py makes one
node per spec in kernels.methods.SPECS.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..kernels.method_spec import CUSTOM, MethodSpec, Setting
from .patching import CATEGORY, FAMILIES_SHORT, model_input, patch_model
from .types import TokenRatioScheduleType


def widget_value(value):
    """A config value as its node widget holds it (a tuple of pooling windows as "2, 2, 2, 1")."""
    return ", ".join(str(v) for v in value) if isinstance(value, tuple) else value


def setting_input(setting: Setting, default):
    """The expert (advanced) input of one setting, typed by its config default."""
    kw = dict(default=widget_value(default), tooltip=setting.tooltip)
    if setting.options:
        inp = io.Combo.Input(setting.name, options=list(setting.options), **kw)
    elif isinstance(default, bool):
        inp = io.Boolean.Input(setting.name, **kw)
    elif isinstance(default, int):
        inp = io.Int.Input(setting.name, min=setting.min, max=setting.max, **kw)
    elif isinstance(default, float):
        inp = io.Float.Input(setting.name, min=setting.min, max=setting.max, step=setting.step, **kw)
    else:
        inp = io.String.Input(setting.name, **kw)
    inp.extra_dict["advanced"] = True  # the web extension greys it while a preset decides its value
    return inp


def preset_input(spec: MethodSpec):
    names = ", ".join(spec.presets)
    return io.Combo.Input("preset", options=[*spec.presets, CUSTOM], default="balanced",
                          tooltip=f"{spec.amount} ({names}: from closest to the unpatched model to fastest). Pick "
                                  "custom to use the advanced settings below instead.")


class PatchNode(io.ComfyNode):
    """Subclasses set SPEC; everything else comes from it."""

    SPEC: MethodSpec

    @classmethod
    def define_schema(cls) -> io.Schema:
        spec, defaults = cls.SPEC, cls.SPEC.config()
        return io.Schema(
            node_id=spec.node_id,
            display_name=spec.display_name,
            category=CATEGORY,
            description=spec.description.format(families=FAMILIES_SHORT),
            inputs=[model_input(), preset_input(spec),
                    *(setting_input(s, getattr(defaults, s.name)) for s in spec.settings),
                    TokenRatioScheduleType.Input("schedule", optional=True, tooltip=spec.schedule_tooltip)],
            outputs=[io.Model.Output(tooltip=spec.output_tooltip)],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, preset="balanced", schedule=None, **settings) -> io.NodeOutput:
        spec = cls.SPEC
        method = spec.build(preset, schedule, **settings)
        return io.NodeOutput(patch_model(model, method, spec.key, spec.display_name, cls.hidden.unique_id))


def patch_node(spec: MethodSpec) -> type[PatchNode]:
    """The node class of a spec, named by its node id."""
    return type(spec.node_id, (PatchNode,), {"SPEC": spec, "__doc__": f"{spec.display_name}: MODEL in, patched MODEL out."})


def preset_widgets(spec: MethodSpec) -> dict:
    """What the frontend shows for a node's presets: its expert widgets, each preset's values for them, and
    the widgets a connected schedule replaces."""
    presets = {p: {s.name: widget_value(getattr(spec.config_for(p), s.name)) for s in spec.settings}
               for p in spec.presets}
    return {"custom": CUSTOM, "expert": [s.name for s in spec.settings], "presets": presets,
            "schedule_replaces": list(spec.schedule_replaces)}
