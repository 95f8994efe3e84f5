"""Research code: the Optuna search."""
