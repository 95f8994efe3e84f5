"""Data: layout discovery, decoding, preprocessing, caching, splitting and the demo set.

Import from the submodules (``melanoma.classifier.preprocessing`` and ``melanoma.data.layout`` are the
served model's; the others need scikit-learn and tqdm)."""
