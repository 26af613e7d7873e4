import numpy as np
import pytest

from mdmt_tf.models import FeatureSchema
from mdmt_tf.preprocessing import FeatureFront, encode


@pytest.fixture(scope="package")
def encoded(small_data):
    """(schema, {split: (encoded features, labels)}) of the small synthetic dataset."""
    data, spec = small_data, small_data.spec
    front = FeatureFront.from_data(spec, data.vocab)
    splits = {s: (encode(front, data.raw_features(s)), data.labels(s)) for s in ("train", "val", "test")}
    return FeatureSchema.from_data(spec, data.vocab), splits


def take(features, labels, index):
    index = np.asarray(index)
    return {k: v[index] for k, v in features.items()}, {k: v[index] for k, v in labels.items()}
