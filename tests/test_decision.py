"""The threshold rule as a value: stored with a model, read back by one function, stated in words."""

import math

import numpy as np
import pytest

from melanoma.classifier.decision import LEGACY_TARGET_SENSITIVITY, ThresholdRule, labels_at
from melanoma.classifier.errors import SettingsError


def test_labels_are_malignant_at_or_above_the_threshold():
    assert labels_at(np.array([0.1, 0.4, 0.41, 0.9]), 0.4) == ["benign", "malignant", "malignant", "malignant"]


@pytest.mark.parametrize("rule", [ThresholdRule.validation(0.85), ThresholdRule("crossval", 0.9, 0.955),
                                  ThresholdRule("site", 0.8, 0.8)])
def test_a_rule_comes_back_from_its_record(rule):
    assert ThresholdRule.from_record(rule.record()) == rule
    as_logged = {k: str(v) for k, v in rule.record().items()}  # a run's params and tags are strings
    assert ThresholdRule.from_record(as_logged) == rule


def test_each_rule_says_what_it_aims_for():
    assert ThresholdRule.validation(0.85).in_words() == ("that finds 85% of the melanomas in the model's "
                                                         "validation set")
    crossval = ThresholdRule("crossval", 0.9, 0.955).in_words()
    assert "95.5% of the validation melanomas" in crossval and "find 90% of that source's" in crossval
    assert "site's own labelled photos to find 80%" in ThresholdRule("site", 0.8, 0.8).in_words()


def test_a_model_logged_before_the_rule_gets_the_rule_it_was_trained_with():
    assert ThresholdRule.from_record({}) == ThresholdRule.validation(LEGACY_TARGET_SENSITIVITY)
    old_crossval = {"threshold_rule": "crossval", "target_sensitivity": 0.9, "threshold_validation_sensitivity": 0.96}
    assert ThresholdRule.from_record(old_crossval).validation_sensitivity == 0.96
    # A missing or zero share is never turned into a rule: the target stands in for it.
    for share in (math.nan, 0.0):
        assert ThresholdRule.from_record({"target_sensitivity": 0.9,
                                          "threshold_validation_sensitivity": share}).validation_sensitivity == 0.9


def test_an_unknown_rule_or_share_is_refused():
    with pytest.raises(SettingsError, match="threshold rule must be one of"):
        ThresholdRule("guess", 0.9, 0.9)
    with pytest.raises(SettingsError, match=r"must be in \(0, 1\]"):
        ThresholdRule("validation", 1.5, 1.5)
