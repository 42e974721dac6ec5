"""Sample quality without downloads: a classifier trained here on labelled bundled data provides the features
for a Fréchet distance, k-NN precision and recall and a class histogram, each beside its noise floor."""

from __future__ import annotations

from mulan.config import DataConfig
from mulan.data.labels import LABELLED
from mulan.presets import get_preset
from mulan.quality.score import METRICS, ScoreReport, score

# how each labelled dataset is split for the score: as the presets that train on it split it
DATA_PRESETS = {"digits": "digits-vdm", "fashion-mnist": "fashion-vdm"}


def data_config(name: str) -> DataConfig:
    """The data configuration the score uses for dataset ``name`` (its presets' split and validation images)."""
    if name not in DATA_PRESETS:
        raise ValueError(f"no score for dataset {name!r}; labelled datasets: {', '.join(LABELLED)}")
    return get_preset(DATA_PRESETS[name]).data


__all__ = ["DATA_PRESETS", "METRICS", "ScoreReport", "data_config", "score"]
