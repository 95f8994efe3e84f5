"""Data: layout discovery, decoding, preprocessing, caching, splitting and the demo set."""

from melanoma.data.dataset import PreparedData, cache_dir, prepare_dataset, split_train_val
from melanoma.data.demo import demo_dataset, make_demo_dataset, resolve_dataset, synthetic_lesion
from melanoma.data.layout import CLASSES, DataError, ImageRecord, Source, discover, read_file
from melanoma.data.preprocessing import (
    InvalidImageError,
    PreprocessSpec,
    decode_image,
    load_for_model,
    normalize,
    preprocess,
)

__all__ = [
    "CLASSES", "DataError", "ImageRecord", "InvalidImageError", "PreparedData", "PreprocessSpec", "Source",
    "cache_dir", "decode_image", "demo_dataset", "discover", "load_for_model", "make_demo_dataset",
    "normalize", "prepare_dataset", "preprocess", "read_file", "resolve_dataset", "split_train_val",
    "synthetic_lesion",
]
