"""The decision a model serves: its classes, its operating threshold and the rule that chose it.

A threshold is only as meaningful as the rule behind it, so the rule travels with the model as a
value (its name and the shares it aims for) and every place that states a threshold (the card,
the page, ``predict``, ensembles, site versions) reads it from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from melanoma.classifier.errors import SettingsError

CLASSES = ("benign", "malignant")  # label = index: malignant (1) is the positive class
# validation: the threshold that finds target_sensitivity of the in-source validation melanomas;
# crossval: the one that found it on sources a model had never seen (melanoma.workflows.crossval);
# site: chosen on a clinic's own labelled photos (melanoma.workflows.adapt).
RULES = ("validation", "crossval", "site")
# Models logged before the rule was stored were all set for this share with the validation rule.
LEGACY_TARGET_SENSITIVITY = 0.9


def labels_at(probabilities: np.ndarray, threshold: float) -> list[str]:
    """The class name of each calibrated malignant probability at ``threshold``."""
    return [CLASSES[int(p >= threshold)] for p in np.asarray(probabilities)]


@dataclass(frozen=True)
class ThresholdRule:
    """How an operating threshold was chosen.

    ``target_sensitivity``: the share of melanomas the rule aims to find where the model is used;
    ``validation_sensitivity``: the share of the melanomas of the set it was chosen on (validation,
    or the site's photos) that the threshold finds there. They differ for the crossval rule alone.
    """

    name: str = "validation"
    target_sensitivity: float = LEGACY_TARGET_SENSITIVITY
    validation_sensitivity: float = LEGACY_TARGET_SENSITIVITY

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise SettingsError(f"threshold rule must be one of {RULES}, got {self.name!r}")
        for share in (self.target_sensitivity, self.validation_sensitivity):
            if not 0 < share <= 1:
                raise SettingsError(f"a threshold rule's sensitivity must be in (0, 1], got {share}")

    @classmethod
    def validation(cls, target: float) -> ThresholdRule:
        return cls("validation", target, target)

    def record(self) -> dict[str, str | float]:
        """The rule as the three keys a logged model's settings (and a run's record) hold."""
        return {"threshold_rule": self.name, "target_sensitivity": self.target_sensitivity,
                "threshold_validation_sensitivity": self.validation_sensitivity}

    @classmethod
    def from_record(cls, record: Mapping) -> ThresholdRule:
        """The rule from a model's settings or a run's params, metrics and tags merged (the keys of
        ``record``); a model logged before the rule was stored gets the rule it was trained with."""
        name = str(record.get("threshold_rule", "validation"))
        target = float(record.get("target_sensitivity", LEGACY_TARGET_SENSITIVITY))
        share = float(record.get("threshold_validation_sensitivity", target))
        if math.isnan(share) or share <= 0:  # never derive a rule from a missing share
            share = target
        return cls(name, target, share)

    def in_words(self) -> str:
        """The rule as a reader would say it, completing "the threshold ..."."""
        if self.name == "site":
            return (f"chosen on the site's own labelled photos to find {self.target_sensitivity:.0%} of their "
                    "melanomas")
        if self.name == "crossval":
            return (f"that travels: it finds {self.validation_sensitivity:.1%} of the validation melanomas, the share "
                    f"that models trained without a source needed to find {self.target_sensitivity:.0%} of that "
                    "source's melanomas (cross-source validation)")
        return f"that finds {self.target_sensitivity:.0%} of the melanomas in the model's validation set"
