"""The workflows that run inside an active MLflow run: one training run, cross-source validation,
the search and its workers, ensembles, site adaptation and evaluation."""
