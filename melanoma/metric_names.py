"""The names of the metrics a run logs, in one place: the code that logs them and the card that
reads them back both build them here, so no code parses the project's own metric names.

A set's figures share a prefix (``val_op_auc``, ``external_clinic_specificity``): the functions
below give the prefix of each kind of set, ``with_prefix`` reads one set back.
"""

from __future__ import annotations

from collections.abc import Mapping

VALIDATION = "val_op_"  # the validation split at the operating threshold
TEST = "test_op_"  # the dataset's own test split, reported only
SITE = "site_"  # a site's labelled photos at the model's own threshold (melanoma adapt)
SITE_SERVED = "site_served_"  # the same photos at the threshold the site version serves
AUDIT = "audit_"  # the data audit's figures


def validation_source(source: str) -> str:
    """One source's share of the validation split."""
    return f"val_{source}_"


def holdout(source: str) -> str:
    """A source left out of training (``holdout_source``)."""
    return f"holdout_{source}_"


def external(name: str) -> str:
    """An evaluation-only folder (``external``)."""
    return f"external_{name}_"


def evaluation(name: str) -> str:
    """A folder scored later by ``melanoma evaluate``, in its own run."""
    return f"{name}_"


def audit_source(source: str) -> str:
    return f"{AUDIT}{source}_"


def crossval_heldout(source: str) -> str:
    """A source held out by cross-source validation, in the parent run."""
    return f"heldout_{source}_"


def crossval_quoted(source: str) -> str:
    """The same figures, quoted in the final model's run for its card."""
    return f"crossval_{crossval_heldout(source)}"


def rule(name: str) -> str:
    """A threshold rule's figures within a held-out source's (``crossval_heldout``)."""
    return f"{name}_rule_"


def with_prefix(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """The metrics under ``prefix``, named without it."""
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


FINETUNE = "finetune_"  # fine-tuning on a site's photos, cross-fitted (melanoma adapt --finetune)


def finetune_recipe(recipe: str) -> str:
    """One recipe's out-of-fold AUC after each epoch (logged with step = epoch)."""
    layers, _, lr = recipe.partition(":")
    return f"{FINETUNE}oof_auc_{layers}_lr{lr}"


def forgetting(source: str) -> str:
    """A training source's validation photos, before and after a site's fine-tuning."""
    return f"forgetting_{source}_"


def scope(name: str) -> str:
    """The in-scope check on one set of photos (``val``, a held-out source, ``generated_noise``...)."""
    return f"scope_{name}_"
