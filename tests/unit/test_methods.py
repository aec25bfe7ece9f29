"""kernels/methods.py: one MethodSpec per method, and everything a spec promises holds for each."""
import dataclasses

import pytest

from kernels.method_spec import CUSTOM
from kernels.methods import BY_KEY, BY_NODE, SPECS
from kernels.runtime import TokenMethod

SPEC_IDS = [s.key for s in SPECS]


def test_keys_names_and_nodes_are_unique():
    for attr in ("key", "name", "node_id", "display_name"):
        values = [getattr(s, attr) for s in SPECS]
        assert len(set(values)) == len(values), attr
    assert set(BY_KEY) == set(SPEC_IDS) and set(BY_NODE) == {s.node_id for s in SPECS}


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_a_spec_names_its_method_once(spec):
    """The method logs under the spec's name; the description leaves room for the supported families."""
    assert spec.method.name == spec.name and issubclass(spec.method, TokenMethod)
    assert "{families}" in spec.description


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_every_setting_is_a_config_field_and_presets_are_overrides_of_the_defaults(spec):
    fields = {f.name for f in dataclasses.fields(spec.config)}
    assert {s.name for s in spec.settings} <= fields
    assert set(spec.schedule_replaces) <= {s.name for s in spec.settings}
    assert spec.presets["balanced"] == {}, "balanced is the defaults"
    assert CUSTOM not in spec.presets
    for preset, overrides in spec.presets.items():
        assert set(overrides) <= {s.name for s in spec.settings}, preset  # a node can show what it runs
        assert isinstance(spec.build(preset), spec.method)
    for overrides in spec.comparisons.values():
        assert set(overrides) <= fields
        spec.with_settings(overrides)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_custom_takes_the_settings_and_parses_text_ones(spec):
    defaults = spec.config()
    widgets = {s.name: getattr(defaults, s.name) for s in spec.settings}
    for s in spec.settings:
        if s.parse is not None:  # a text widget: the node hands over what was typed
            widgets[s.name] = ", ".join(str(v) for v in widgets[s.name])
    assert spec.config_for(CUSTOM, **widgets) == defaults
    with pytest.raises(ValueError, match=f"^{spec.display_name}: unknown preset 'turbo'"):
        spec.config_for("turbo")


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_a_config_is_validated_when_it_is_made(spec):
    with pytest.raises(ValueError, match=f"^{spec.name}: start_percent must lie in"):
        spec.config(start_percent=1.5)


def test_merging_methods_have_an_every_step_setting_for_the_mechanics_tests():
    for spec in SPECS:
        assert (spec.every_step is not None) == spec.merging, spec.key
        if spec.merging:
            assert not spec.with_settings(spec.every_step).config.detail_cache
