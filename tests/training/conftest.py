import keras
import numpy as np
import pytest

from mdmt_tf.data.dataset import MDMTData, make_dataset
from mdmt_tf.data.readers import Splits, random_split
from mdmt_tf.training.fit import EncodedData


@pytest.fixture(scope="package")
def data(small_synthetic):
    spec, table = small_synthetic
    parts = random_split(table, 0, "synthetic")
    return MDMTData.build(spec, Splits(**parts, sources={s: s for s in parts}))


@pytest.fixture(scope="package")
def enc(data):
    return EncodedData.from_data(data)


def batches(enc, split, batch_size=256, **kw):
    return make_dataset(enc.features[split], enc.labels[split], batch_size=batch_size, **kw)


def values(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]
