"""What a token-reduction method declares about itself (MethodSpec), host-free; kernels/methods.py lists them.

A spec names a method once (its key, its short name, its node) and holds what every list of methods needs:
the config and method classes, the node's presets and expert settings, what a connected schedule replaces,
and the named comparison settings the evidence runs beside the presets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .runtime import MergingMethod


@dataclass(frozen=True)
class Setting:
    """One expert input of a patch node; its value type and default come from the method's config field."""

    name: str
    tooltip: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple = ()                      # a choice among these values
    parse: Callable[[str], object] | None = None  # a text input parsed into the config value ("2, 2, 2, 1")


@dataclass(frozen=True)
class MethodSpec:
    key: str                 # transformer_options and docs key ("sdtm", as in "sdtm:balanced")
    name: str                # short name: logs, tables, the support matrix
    node_id: str
    display_name: str        # the node's title, and the name in its errors
    description: str         # the node's description, after "... for <families>: "
    amount: str              # what the preset chooses ("How much to merge")
    config: type             # frozen dataclass, validated on construction
    method: type             # TokenMethod subclass: method(config, schedule=None)
    presets: dict            # preset -> overrides of the config's defaults ("balanced" = the defaults)
    settings: tuple          # the node's expert inputs (Setting), in widget order
    schedule_replaces: tuple  # config fields a connected TokenRatioSchedule replaces
    schedule_tooltip: str
    output_tooltip: str
    comparisons: dict = field(default_factory=dict)  # evidence rows beside the presets: label -> overrides
    every_step: dict | None = None  # reducing at every step after a short warm-up: the mechanics tests

    def config_for(self, preset: str = "balanced", **settings):
        """The preset's config, or for "custom" the given settings (text settings parsed)."""
        if preset == CUSTOM:
            parsers = {s.name: s.parse for s in self.settings if s.parse is not None}
            return self.config(**{k: parsers[k](v) if k in parsers and isinstance(v, str) else v
                                  for k, v in settings.items()})
        if preset not in self.presets:
            raise ValueError(f"{self.display_name}: unknown preset {preset!r}; choose one of "
                             f"{', '.join([*self.presets, CUSTOM])}")
        return self.config(**self.presets[preset])

    def build(self, preset: str = "balanced", schedule=None, **settings):
        """A fresh method at a preset (or custom settings)."""
        return self.method(self.config_for(preset, **settings), schedule=schedule)

    def with_settings(self, overrides: dict, schedule=None):
        """A fresh method at the defaults with `overrides` (comparison rows)."""
        return self.method(self.config(**overrides), schedule=schedule)

    @property
    def merging(self) -> bool:
        """Merges tokens inside blocks (and so weights attention by group size)."""
        return issubclass(self.method, MergingMethod)


CUSTOM = "custom"  # the preset that runs the node's own expert settings


def progress_window_settings(verb: str, end_note: str = "") -> tuple:
    """start_percent / end_percent; `verb` is "merge", "pool" or "prune"."""
    return (Setting("start_percent", f"Progress at which {verb}ing starts; earlier steps run on every token (1 = "
                                     f"never {verb}, the unpatched model).", 0.0, 1.0, 0.01),
            Setting("end_percent", f"Progress at which {verb}ing stops{end_note}.", 0.0, 1.0, 0.01))
