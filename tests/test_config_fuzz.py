"""Property tests: any override text or config mapping gives a valid Config or a ConfigError, nothing else."""

from __future__ import annotations

import dataclasses
import os
import typing

from hypothesis import given, settings, strategies as st

from mulan.config import Config, apply_overrides, from_dict, to_dict
from mulan.errors import ConfigError
from mulan.presets import get_preset

EXAMPLES = int(os.environ.get("MULAN_FUZZ_EXAMPLES", "300"))
BASE = get_preset("digits-mulan")


def _keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _keys(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


KEYS = sorted(_keys(Config))
values = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(str),
                   st.sampled_from(["true", "false", "eps", "v", "khot", "1,8,8", "0", "-1", "1e9", "nan", "()"]))
override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), values),
    st.builds(lambda k, v: f"{k}={v}", st.text(max_size=20), values),
    st.text(max_size=30),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(override, max_size=4))
def test_overrides_give_a_valid_config_or_a_config_error(items):
    try:
        cfg = apply_overrides(BASE, items)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert isinstance(cfg, Config)
    assert from_dict(Config, to_dict(cfg)) == cfg  # whatever is accepted round-trips through a checkpoint


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                           lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)),
                           max_leaves=8)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sampled_from(KEYS), json_values)
def test_from_dict_with_any_value_gives_a_config_or_a_config_error(key, value):
    data = to_dict(BASE)
    node = data
    *path, leaf = key.split(".")
    for part in path:
        node = node[part]
    node[leaf] = value
    try:
        from_dict(Config, data)
    except ConfigError:
        pass
