"""melanoma: train, compare, tune, register and serve skin-lesion classifiers with MLflow."""

__version__ = "0.1.0"
