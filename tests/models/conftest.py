import numpy as np
import pytest

from mdmt_tf.data.dataset import MDMTData
from mdmt_tf.data.readers import Splits, random_split
from mdmt_tf.models import FeatureSchema
from mdmt_tf.preprocessing import FeatureFront, encode


@pytest.fixture(scope="package")
def encoded(small_synthetic):
    """(schema, {split: (encoded features, labels)}) of the small synthetic dataset."""
    spec, table = small_synthetic
    parts = random_split(table, 0, "synthetic")
    data = MDMTData.build(spec, Splits(**parts, sources={s: s for s in parts}))
    front = FeatureFront.from_data(spec, data.vocab)
    splits = {s: (encode(front, data.raw_features(s)), data.labels(s)) for s in ("train", "val", "test")}
    return FeatureSchema.from_data(spec, data.vocab), splits


def take(features, labels, index):
    index = np.asarray(index)
    return {k: v[index] for k, v in features.items()}, {k: v[index] for k, v in labels.items()}
