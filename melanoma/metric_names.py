"""The names of the metrics a run logs, in one place: the code that logs them and the card that
reads them back both build them here, so no code parses the project's own metric names.

A set's figures share a prefix (``val_op_auc``, ``external_clinic_specificity``). Fixed prefixes
are constants; the prefixes of named sets are templates: ``HOLDOUT.format(source)``.
"""

from __future__ import annotations

from collections.abc import Mapping

VALIDATION = "val_op_"  # the validation split at the operating threshold
TEST = "test_op_"  # the dataset's own test split, reported only
SITE = "site_"  # a site's labelled photos at the model's own threshold (melanoma adapt)
SITE_SERVED = "site_served_"  # the same photos at the threshold the site version serves
AUDIT = "audit_"  # the data audit's figures
FINETUNE = "finetune_"  # fine-tuning on a site's photos, cross-fitted (melanoma adapt --finetune)

VALIDATION_SOURCE = "val_{}_"  # one source's share of the validation split
HOLDOUT = "holdout_{}_"  # a source left out of training (holdout_source)
EXTERNAL = "external_{}_"  # an evaluation-only folder (external)
EVALUATION = "{}_"  # a folder scored later by melanoma evaluate, in its own run
AUDIT_SOURCE = "audit_{}_"  # the audit's figures of one source
CROSSVAL_HELDOUT = "heldout_{}_"  # a source held out by cross-source validation, in the parent run
CROSSVAL_QUOTED = "crossval_heldout_{}_"  # the same figures, quoted in the final model's run for its card
RULE = "{}_rule_"  # a threshold rule's figures within a held-out source's
FORGETTING = "forgetting_{}_"  # a training source's validation photos, before and after a site's fine-tuning
TRAIN_LOSS_SOURCE = "train_loss_{}"  # one training source's loss over an epoch (step = epoch)
DRO_WEIGHT = "dro_weight_{}"  # its weight in group DRO at the epoch's end (balance=dro)
SCOPE = "scope_{}_"  # the in-scope check on one set of photos (val, a held-out source, generated_noise, ...)


def finetune_recipe(recipe: str) -> str:
    """One fine-tuning recipe's out-of-fold AUC after each epoch (logged with step = epoch)."""
    layers, _, lr = recipe.partition(":")
    return f"{FINETUNE}oof_auc_{layers}_lr{lr}"


def with_prefix(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """The metrics under ``prefix``, named without it."""
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
