"""The model card: what a trained model is, what it was trained on, how well it does where, and
what it must not be used for. Markdown (and HTML) written from a run's logged record, so it can be
written again at any time (``melanoma card``), with the run's external evaluations included.
"""

from __future__ import annotations

import logging

import markdown
import mlflow
from mlflow.tracking import MlflowClient

from melanoma import metric_names as names
from melanoma.classifier.decision import CLASSES, ThresholdRule
from melanoma.classifier.errors import SettingsError
from melanoma.config import unquote
from melanoma.data.out_of_scope import GENERATED_KINDS
from melanoma.evaluate import external_names
from melanoma.intervals import INTERVAL_METRICS
from melanoma.metric_names import with_prefix
from melanoma.tracking import run_record

log = logging.getLogger(__name__)

CARD_FILE = "model_card.md"
CARD_HTML_FILE = "model_card.html"
FIELD_METRICS = ("pauc_above_80_sensitivity", "average_precision", "specificity_at_90_sensitivity",
                 "specificity_at_95_sensitivity")


def listed(text: str | None) -> list[str]:
    """A comma-separated param or tag as a list (a quoted empty value is none)."""
    return [item for item in unquote(text or "").split(",") if item]


def sources_of(params: dict[str, str]) -> list[str]:
    """The data's sources, as the run logged them."""
    return listed(params.get("data_sources"))


def evaluated_sets(run, evaluations: list) -> dict[str, dict[str, float]]:
    """Every set the run (or a later ``melanoma evaluate``) reported at the operating threshold."""
    params, metrics = run.data.params, run.data.metrics
    sets = {"validation": with_prefix(metrics, names.VALIDATION)}
    for source in sources_of(params):
        if f"{names.VALIDATION_SOURCE.format(source)}count" in metrics:
            sets[f"validation, {source} only"] = with_prefix(metrics, names.VALIDATION_SOURCE.format(source))
    if f"{names.TEST}count" in metrics:
        sets["test"] = with_prefix(metrics, names.TEST)
    for source in listed(params.get("holdout_source")):
        sets[f"held-out source: {source}"] = with_prefix(metrics, names.HOLDOUT.format(source))
    for name in external_names(listed(params.get("resolved_external", params.get("external")))):
        sets[f"external: {name}"] = with_prefix(metrics, names.EXTERNAL.format(name))
    for evaluation in evaluations:
        name = evaluation.data.params.get("name", evaluation.info.run_name)
        sets[f"evaluated: {name}"] = with_prefix(evaluation.data.metrics, names.EVALUATION.format(name))
    return {name: values for name, values in sets.items() if values}


def with_interval(values: dict[str, float], name: str) -> str:
    if name not in values:
        return "-"
    text = f"{values[name]:.3f}"
    if f"{name}_ci_low" in values:
        text += f" ({values[f'{name}_ci_low']:.3f}-{values[f'{name}_ci_high']:.3f})"
    return text


def threshold_origin(run) -> list[str]:
    """The rule that chose the threshold and, for the crossval rule, what it gave at sources the
    models never saw (the figures a new clinic can expect)."""
    rule = ThresholdRule.from_record(run_record(run))
    lines = [f"Rule: the threshold {rule.in_words()}."]
    sources = listed(run.data.tags.get("crossval_sources"))
    if rule.name != "crossval":
        return lines
    if not sources or "ensemble_runs" in run.data.tags:
        return [lines[0] + " The cross-source figures are in the runs that chose the share.", ""]
    lines += ["", "At a source the model never saw, each source held out in turn, the rule gave (the validation "
              "rule beside it):", "",
              "| held-out source | AUC | sensitivity | specificity | with the validation rule: sensitivity | specificity |",
              "|---|---|---|---|---|---|"]
    for source in sources:
        row = with_prefix(run.data.metrics, names.CROSSVAL_QUOTED.format(source))
        lines.append(f"| {source} | {row.get('auc', float('nan')):.3f} | " + " | ".join(
            f"{row.get(f'{names.RULE.format(rule_name)}{name}', float('nan')):.3f}" for rule_name in ("crossval", "validation")
            for name in ("sensitivity", "specificity")) + " |")
    return lines + [""]


def in_words(sets: dict[str, dict[str, float]]) -> list[str]:
    """The operating point as a reader would say it, per set."""
    lines = []
    for name, values in sets.items():
        parts = []
        if "sensitivity" in values:
            parts.append(f"finds {round(100 * values['sensitivity'])} of 100 melanomas")
        if "specificity" in values:
            parts.append(f"calls {round(100 * (1 - values['specificity']))} of 100 benign lesions malignant")
        if parts:
            lines.append(f"- On **{name}** ({int(values.get('count', 0))} images) it " + ", and ".join(parts) + ".")
    return ["", *lines]


def card_markdown(run, evaluations: list) -> str:
    """The card of a training run (an ``mlflow.entities.Run``) and its later evaluation runs."""
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    sets = evaluated_sets(run, evaluations)
    synthetic = tags.get("synthetic_data") == "true"
    lines = [
        f"# Model card: melanoma classifier `{p.get('model')}` (run `{run.info.run_id}`)",
        "",
        "**Research software, not a medical device.** It has not been cleared or approved by any regulator, "
        "must not be used to diagnose, treat or triage patients, and must not replace a clinician's examination "
        "or a biopsy.",
        "",
        "## Intended use",
        "Research on benign vs malignant classification of dermoscopy photographs of single skin lesions: "
        "comparing training recipes, studying shortcut learning and generalisation to other collections. "
        "Input: one dermoscopic photograph (JPEG/PNG) of one lesion. Output: a calibrated malignant probability "
        "and a label at the operating threshold below.",
        "",
        "## Data",
        f"- Dataset: `{p.get('data_location', p.get('data'))}`" + (" (**synthetic demo data**)" if synthetic else ""),
        f"- Content digest `{p.get('data_digest', '?')}`; {p.get('data_skipped_files', 0)} unreadable files skipped.",
        "",
        "| split | benign | malignant | total |",
        "|---|---|---|---|",
        *[f"| {split} | {p.get(f'data_{split}_benign', 0)} | {p.get(f'data_{split}_malignant', 0)} | "
          f"{p.get(f'data_{split}_count', 0)} |" for split in ("train", "val", "test")
          if p.get(f"data_{split}_count", "0") != "0"],
        "",
        *source_rows(p, m),
        f"- Audit: {tags.get('audit_verdict', 'not run')}.",
        f"- Duplicates: {int(m.get('audit_exact_duplicate_pairs', 0))} exact and "
        f"{int(m.get('audit_near_duplicate_pairs', 0))} near-duplicate pairs; exact duplicates are kept on one "
        "side of the split and resampled together for the intervals.",
        "",
        "## Preprocessing",
        f"{p.get('img_size')} px square, {'RGB' if p.get('channels') == '3' else 'grayscale'}, lesion crop "
        f"{p.get('crop_lesion')} ({p.get('crop_method', 'largest')} dark blob, margin {p.get('crop_margin', '0.2')} "
        "of the lesion's size), "
        f"colour constancy {p.get('color_constancy')}, corner mask {p.get('mask_corners')}; "
        "the same function in training and serving.",
        "",
        "## Model and recipe",
        f"`{p.get('model')}` ({int(p.get('parameters', 0)):,} parameters), pretrained `{p.get('pretrained')}`; "
        f"{p.get('optimizer')} lr {p.get('lr')} (backbone x{p.get('backbone_lr_factor')}), weight decay "
        f"{p.get('weight_decay')}, warm-up {p.get('warmup_epochs')} epochs, frozen backbone "
        f"{p.get('freeze_epochs')} epochs, label smoothing {p.get('label_smoothing')}, EMA {p.get('ema')}, "
        f"WiSE-FT alpha {p.get('wise_alpha')}, augmentation `{p.get('augment')}`, batch {p.get('batch_size')}, "
        + (f"{int(m['epochs_run'])} epochs run (best {int(m.get('best_epoch', 0))}, by validation AUC)."
           if "epochs_run" in m else f"{p.get('epochs')} epochs each."),
        *([f"An ensemble: the logits of the members (training runs {tags['ensemble_runs']}) averaged; calibration "
           "and threshold fitted again on their shared validation split."] if "ensemble_runs" in tags else []),
        "",
        "## Operating point",
        f"Threshold {m.get('threshold', float('nan')):.3f} on the calibrated probability.",
        "",
        *threshold_origin(run),
        *in_words(sets),
        "",
        "## Performance (95 % bootstrap intervals)",
        "",
        "| set | images | AUC | sensitivity | specificity | balanced accuracy |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {int(v.get('count', 0))} | " + " | ".join(with_interval(v, k) for k in INTERVAL_METRICS) + " |"
          for name, v in sets.items()],
        "",
        "| set | pAUC above 80 % sensitivity (0-0.2) | average precision | specificity at 90 % / 95 % sensitivity |",
        "|---|---|---|---|",
        *[f"| {name} | {with_interval(v, FIELD_METRICS[0])} | {with_interval(v, FIELD_METRICS[1])} | "
          f"{with_interval(v, FIELD_METRICS[2])} / {with_interval(v, FIELD_METRICS[3])} |"
          for name, v in sets.items() if "auc" in v],
        "",
        "## Calibration",
        f"Method `{p.get('calibration', 'none')}` fitted on validation (temperature {m.get('temperature', 1.0):.3f}).",
        "",
        "| set | ECE before | ECE after | Brier before | Brier after |",
        "|---|---|---|---|---|",
        *[f"| {name} | {v['ece_uncalibrated']:.3f} | {v['ece']:.3f} | {v['brier_uncalibrated']:.3f} | "
          f"{v['brier']:.3f} |" for name, v in sets.items() if "ece" in v],
        "",
        *scope_section(p, m),
        "## Explanations",
        "Grad-CAM for the predicted class on examples of both classes (artifacts `gradcam/`); the served "
        "model returns an overlay per image with `\"params\": {\"explain\": true}`.",
        "",
        *[f"![Grad-CAM, {split}](gradcam/gradcam_{split}.png)" for split in ("test", "val")
          if f"{split}_op_count" in m or (split == "val" and "test_op_count" not in m)],
        "",
        "## Known limitations",
        *limitations(p, m, sets),
        "",
        "## CLEAR Derm checklist (the items this data can answer)",
        "- Image type: dermoscopic photographs. Devices and acquisition protocol: not recorded.",
        "- Skin tone (Fitzpatrick type), age, sex, body site: not recorded in this dataset; performance across "
        "them is unknown.",
        "- Diagnoses: two classes (benign, malignant) as labelled by the dataset; how each diagnosis was "
        "established (histopathology, follow-up, consensus) is not recorded here.",
        f"- Partition: a seeded {float(p.get('val_fraction', 0.15)):.0%} validation split carved out of training, "
        "stratified by source and class, a lesion's photos and copies of one photo on one side; the test split "
        "(if any) was never used for selection.",
        "- External evaluation: " + (", ".join(n for n in sets if n.startswith(("external", "evaluated")))
                                     or "none in this run") + ".",
        "- Threshold: chosen on validation before any test or external figure was seen.",
        "",
    ]
    return "\n".join(lines)


def scope_section(params: dict[str, str], metrics: dict[str, float]) -> list[str]:
    """What the in-scope check does and what it was measured to catch."""
    if "scope_threshold" not in metrics:
        return ["## In scope", "No in-scope check (a model logged before the check existed, or an ensemble): it "
                "cannot tell a dermoscopy photo from anything else, and answers for any picture.", ""]
    share = metrics.get("scope_in_scope_share_target", float("nan"))
    each_source = [k[len("scope_val_"):-len("_in_scope")] for k in sorted(metrics)
                   if k.startswith("scope_val_") and k.endswith("_in_scope") and k != "scope_val_in_scope"]
    sets = {"validation": "val", **{f"validation, {s}": f"val_{s}" for s in each_source},
            **{f"held-out source {s}": s for s in listed(params.get("holdout_source"))}, "test": "test"}
    kept = [f"{name} {metrics[f'{names.SCOPE.format(key)}in_scope']:.1%}" for name, key in sets.items()
            if f"{names.SCOPE.format(key)}in_scope" in metrics]
    caught = [f"{kind} {metrics[key]:.0%}" for kind in GENERATED_KINDS
              if (key := f"{names.SCOPE.format('generated_' + kind.replace(' ', '_'))}caught") in metrics]
    return ["## In scope",
            "Every answer says whether the photo is one the model is made for: a photo whose feature statistics lie "
            f"further from the training photos' than those of {share:.0%} of each source's validation photos is "
            f"out of scope (score threshold {metrics['scope_threshold']:.3g}); it keeps its probability, and its label "
            "says it is out of scope.", "", *scope_limits(metrics),
            "- Photos in scope: " + (", ".join(kept) or "-") + ".",
            "- Generated pictures caught: " + (", ".join(caught) or "-") + ".",
            "- Measured on real non-dermoscopic skin photos and everyday photos: docs/results.md.", ""]


def scope_limits(metrics: dict[str, float]) -> list[str]:
    """The card's lines on the check's colour limit and on a boundary learned from supplied
    out-of-scope pictures, where the model has them."""
    lines = []
    if "scope_colour_limit" in metrics:
        lines += ["A picture with less colour than a tenth of the palest validation photos (a grey picture: a "
                  "radiograph, a scan, a black-and-white photo) is out of scope too.", ""]
    supplied = metrics.get("scope_negatives_supplied")
    if supplied is None:
        return lines + ["Photos of skin taken without a dermoscope (clinical close-ups, total-body photography) "
                        "mostly stay in scope: the check cannot tell them from dermoscopy, and the figures on this card "
                        "do not hold for them. Send dermoscopy photos only, or train with `scope_negatives` (a folder of "
                        "such photos) to learn a boundary against them (docs/results.md).", ""]
    return lines + [f"The check also learned a boundary from {supplied:.0f} pictures supplied as out of scope "
            "(`scope_negatives`) and generated ones: a photo beyond the distance's or the boundary's limit is out of "
            "scope. Pictures like the supplied ones are caught more often; how often, for kinds never supplied, only a "
            "set the check never saw can say (docs/results.md).", ""]


def limitations(params: dict[str, str], metrics: dict[str, float], sets: dict[str, dict[str, float]]) -> list[str]:
    lines = []
    probe = metrics.get("audit_border_probe_auc")
    if probe is not None and probe >= 0.8:
        lines.append(f"- The image border alone predicts the label in the training data (border-probe AUC "
                     f"{probe:.3f}): the classes were photographed differently, and a model can learn the "
                     "photograph instead of the lesion.")
    for source, row in source_counts(params, metrics).items():
        if min(row.values()) == 0:
            lines.append(f"- Every {source} image in the training data is {max(row, key=row.get)}: there the source "
                         "predicts the label, and the model may have learned the source.")
    val_spec = sets["validation"].get("specificity")
    for name, values in sets.items():
        if name.startswith(("external", "evaluated", "held-out")) and "specificity" in values and val_spec is not None:
            line = f"- On {name} the specificity is {values['specificity']:.3f}, against {val_spec:.3f} on validation"
            if values["specificity"] < val_spec - 0.05:
                line += ": the operating point does not travel unchanged to another collection"
            lines.append(line + ".")
    lines.append("- Trained and evaluated on dermoscopy images only; clinical (non-dermoscopic) photos, "
                 "non-lesion images and lesion types absent from training are out of scope.")
    return lines


def source_counts(params: dict[str, str], metrics: dict[str, float]) -> dict[str, dict[str, int]]:
    return {s: {c: int(metrics.get(f"{names.AUDIT_SOURCE.format(s)}{c}", 0)) for c in CLASSES} for s in sources_of(params)}


def source_rows(params: dict[str, str], metrics: dict[str, float]) -> list[str]:
    """The audit's source x class table (the confound, where a source holds one class)."""
    counts = source_counts(params, metrics)
    if not counts:
        return []
    return ["", "| source | benign | malignant | border probe AUC |", "|---|---|---|---|",
            *[f"| {s} | {row['benign']} | {row['malignant']} | {metrics.get(f'{names.AUDIT_SOURCE.format(s)}border_probe_auc', float('nan')):.3f} |"
              for s, row in counts.items()], ""]


def evaluations_of(run_id: str) -> list:
    """The ``melanoma evaluate`` runs of this run's model, in any experiment."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.source_run_id = '{run_id}' and tags.evaluation = 'external'")


def log_card(run_id: str) -> str:
    """Write the run's card (Markdown and HTML) as artifacts of the run; returns the Markdown."""
    client = MlflowClient()
    text = card_markdown(client.get_run(run_id), evaluations_of(run_id))
    client.log_text(run_id, text, CARD_FILE)
    client.log_text(run_id, markdown.markdown(text, extensions=["tables"]), CARD_HTML_FILE)
    return text


# A registered version's description holds at most this many characters on some stores (MLflow's
# SQL schema: VARCHAR(5000); PostgreSQL enforces it, SQLite does not).
MAX_DESCRIPTION = 5000


def version_description(card: str, run_id: str) -> str:
    """The card as a registered version's description: whole where it fits, else cut at a section
    and ended with where the whole card is."""
    if len(card) <= MAX_DESCRIPTION:
        return card
    pointer = f"\n\n*The card continues in the artifact `{CARD_FILE}` of run `{run_id}`.*\n"
    cut = card[:MAX_DESCRIPTION - len(pointer)]
    cut = cut[:cut.rfind("\n## ")] if "\n## " in cut else cut
    return cut.rstrip() + pointer


def run_id_of(run_or_model: str) -> str:
    """The training run behind a run id, ``runs:/ID/...`` or ``models:/NAME/VERSION|@ALIAS`` URI."""
    if run_or_model.startswith(("runs:/", "models:/")):
        run_id = mlflow.models.get_model_info(run_or_model).run_id
        if not run_id:
            raise SettingsError(f"{run_or_model} does not name a model logged by a run")
        return run_id
    return run_or_model


def write_card(run_or_model: str) -> str:
    """``melanoma card``: the card again, logged to its run and set as the description of every
    registered version of that run's model."""
    run_id = run_id_of(run_or_model)
    text = log_card(run_id)
    client = MlflowClient()
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        client.update_model_version(version.name, version.version, description=version_description(text, run_id))
    return text
