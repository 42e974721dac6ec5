"""Property tests: any override text or config mapping gives a valid Config or a ConfigError, nothing else."""

from __future__ import annotations

import dataclasses
import os
import typing

import pytest
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
        cfg = from_dict(Config, data)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
        return
    # accepted: the field holds the value (converted only as its type says) and nothing else changed
    tp = field_type(key)
    stored = cfg
    for part in key.split("."):
        stored = getattr(stored, part)
    if typing.get_origin(tp) is typing.Literal:
        assert stored in typing.get_args(tp) and stored == value
    elif typing.get_origin(tp) is tuple:
        assert isinstance(stored, tuple) and list(stored) == list(value) and all(type(v) is int for v in stored)
    else:
        assert type(stored) is tp and (stored == value or stored != stored and value != value)  # NaN is NaN
    before, after = to_dict(BASE), to_dict(cfg)
    assert [k for k in KEYS if lookup(before, k) != lookup(after, k)] in ([], [key])
    assert from_dict(Config, to_dict(cfg)) == cfg


def field_type(key: str):
    cls = Config
    *path, leaf = key.split(".")
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[leaf]


def lookup(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


def test_from_dict_keeps_what_it_accepts():
    """The fuzzer's success path, with values known to be accepted or refused."""
    data = to_dict(BASE)
    data["train"]["lr"], data["data"]["shape"] = 3, [1, 4, 4]  # an int for a float field; a list for a tuple
    cfg = from_dict(Config, data)
    assert cfg.train.lr == 3.0 and type(cfg.train.lr) is float and cfg.data.shape == (1, 4, 4)
    data["train"]["steps"] = 2.5
    with pytest.raises(ConfigError, match="train.steps|steps"):
        from_dict(Config, data)
