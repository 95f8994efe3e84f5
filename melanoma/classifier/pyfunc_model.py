"""Models-from-code entry point: MLflow runs this file to build the served model.

Logged with the package as ``code_paths``, so the model loads where melanoma is not installed.
"""

from mlflow.models import set_model

from melanoma.classifier.pyfunc import MelanomaClassifier

set_model(MelanomaClassifier())
