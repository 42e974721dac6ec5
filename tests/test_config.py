"""Every setting acts or is refused: an explicit setting that the configuration would ignore is a one-line error
naming its key, and each refusal is checked against the model itself (built with the setting forced in, it is the
same model; where the setting is accepted, it is another)."""

from __future__ import annotations

import pytest
import torch

from conftest import perturb, tiny
from mulan.config import Config, apply_overrides
from mulan.diffusion import build_model
from mulan.errors import ConfigError

# (preset, overrides before, the ignored setting)
IGNORED_MODEL = [
    ("digits-fixed", (), "model.schedule.learn_ends=pixel"),  # the case: a fixed schedule, no parameters
    ("digits-vdm", (), "model.schedule.learn_ends=scalar"),
    ("digits-vdm-net", (), "model.schedule.pixel_mean=true"),
    ("digits-vdm", (), "model.schedule.adaptive=false"),
    ("digits-vdm", (), "model.schedule.decoder=lowrank"),
    ("digits-fixed", (), "model.schedule.hidden=8"),
    ("digits-mulan-no-latent", (), "model.schedule.adaptive=false"),  # no z to feed
    ("digits-mulan", (), "model.schedule.hidden=8"),  # the dense decoder is as wide as the image
    ("digits-mulan", (), "model.schedule.monotone_features=8"),
    ("digits-mulan", (), "model.schedule.pixel_features=4"),
    ("digits-vdm", (), "model.latent.m=8"),
    ("digits-vdm", (), "model.latent.k=2"),
    ("digits-vdm", (), "model.latent.noise=gamma"),
    ("digits-vdm", (), "model.latent.train_kl=strict"),
    ("digits-vdm", (), "model.latent.encoder_channels=8"),
    ("digits-mulan", ("model.latent.kind=gaussian",), "model.latent.k=3"),
    ("digits-mulan", ("model.latent.kind=gaussian",), "model.latent.noise=gamma"),
    ("digits-mulan", ("model.latent.kind=gaussian",), "model.latent.train_kl=strict"),
]
# the same settings where they act
ACTING_MODEL = [
    ("digits-mulan", (), "model.schedule.learn_ends=pixel"),
    ("digits-mulan-no-latent", (), "model.schedule.learn_ends=scalar"),
    ("digits-mulan", (), "model.schedule.pixel_mean=true"),
    ("digits-mulan", (), "model.schedule.adaptive=false"),
    ("digits-mulan", (), "model.schedule.decoder=lowrank"),
    ("digits-mulan", ("model.schedule.decoder=conv",), "model.schedule.hidden=8"),
    ("digits-vdm-net", (), "model.schedule.monotone_features=8"),
    ("digits-mulan", ("model.schedule.kind=pixel_monotone_net",), "model.schedule.pixel_features=4"),
    ("digits-mulan", (), "model.latent.m=6"),
    ("digits-mulan", (), "model.latent.k=3"),
    ("digits-mulan", (), "model.latent.noise=gamma"),
    ("digits-mulan", (), "model.latent.train_kl=strict"),
    ("digits-mulan", (), "model.latent.encoder_channels=8"),
]
# settings outside the model: refused where ignored, accepted where they act
IGNORED_OTHER = [
    ("digits-fixed", (), "train.schedule_lr_scale=10"),  # a fixed schedule has no parameters
    ("digits-fixed", (), "train.schedule_weight_decay=0"),
    ("digits-mulan", ("eval.ode_divergence=exact",), "eval.ode_probes=4"),
    ("digits-mulan", ("eval.ode_divergence=exact",), "eval.ode_probe_dist=gaussian"),
    ("digits-mulan", (), "data.path=/some/where"),  # digits are bundled
    ("digits-mulan", (), "data.test_path=/some/where"),
    ("digits-mulan", ("data.name=synthetic",), "data.test_fraction=0.5"),  # synthetic brings its test split
    ("digits-mulan", ("data.name=idx", "data.path=a.idx", "data.test_path=b.idx"), "data.test_fraction=0.5"),
]
ACTING_OTHER = [
    ("digits-vdm", (), "train.schedule_lr_scale=10"),
    ("digits-mulan", (), "eval.ode_probes=4"),
    ("digits-mulan", (), "data.test_fraction=0.5"),
    ("digits-mulan", ("data.name=idx",), "data.path=a.idx"),
    ("digits-mulan", ("data.name=idx", "data.path=a.idx"), "data.test_path=b.idx"),
]


def forced(preset: str, before: tuple[str, ...], setting: str) -> tuple[Config, Config]:
    """The tiny config of ``preset`` + ``before``, and the same with ``setting`` written in without any check."""
    base = tiny(preset, *before)
    other = apply_overrides(base, [])  # a copy
    *path, leaf = setting.partition("=")[0].split(".")
    node = other
    for part in path:
        node = getattr(node, part)
    text = setting.partition("=")[2]
    old = getattr(node, leaf)
    setattr(node, leaf, type(old)(text == "true") if isinstance(old, bool) else type(old)(text))
    return base, other


def same_model(a: Config, b: Config) -> bool:
    """Whether two configs build the same model: the same parameters from one seed and, with every parameter
    moved off its init, the same ELBO terms while training (latent noise, KL charged) and at evaluation."""
    models = []
    for cfg in (a, b):
        torch.manual_seed(0)
        models.append(perturb(build_model(cfg), 0.1))
    sa, sb = (m.state_dict() for m in models)
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]) for k in sa):
        return False
    x = torch.randint(0, 17, (4, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    for training in (True, False):
        terms = []
        for m in models:
            m.train(training)
            torch.manual_seed(2)  # dropout
            terms.append(m.elbo_terms(x, generator=torch.Generator().manual_seed(3)))
        if any(not torch.equal(getattr(terms[0], k), getattr(terms[1], k)) for k in terms[0].as_dict()):
            return False
    return True


@pytest.mark.parametrize("preset, before, setting", IGNORED_MODEL + IGNORED_OTHER)
def test_a_setting_that_would_be_ignored_is_refused_in_one_line_naming_it(preset, before, setting):
    key = setting.partition("=")[0]
    with pytest.raises(ConfigError) as refusal:
        tiny(preset, *before, setting)
    message = str(refusal.value)
    assert "\n" not in message and message.startswith(f"{setting} would be ignored: "), message
    if key.startswith("model."):  # and it is indeed ignored: forced in, it builds the same model
        assert same_model(*forced(preset, before, setting))


@pytest.mark.parametrize("preset, before, setting", ACTING_MODEL + ACTING_OTHER)
def test_the_same_setting_is_accepted_where_it_acts(preset, before, setting):
    cfg = tiny(preset, *before, setting)
    if setting.startswith("model."):
        assert not same_model(tiny(preset, *before), cfg)


def test_restating_a_default_is_accepted_and_the_order_of_overrides_does_not_matter():
    tiny("digits-fixed", "model.schedule.learn_ends=none", "model.latent.m=16")  # defaults: nothing is ignored
    # the setting acts in the config the overrides arrive at, wherever the kind is set
    cfg = tiny("digits-fixed", "model.schedule.learn_ends=pixel", "model.schedule.kind=polynomial")
    assert cfg.model.schedule.learn_ends == "pixel"
