import keras
import numpy as np
import pytest

from mdmt_tf.data.dataset import make_dataset
from mdmt_tf.training.encoded import EncodedData


@pytest.fixture(scope="package")
def data(small_data):
    return small_data


@pytest.fixture(scope="package")
def enc(data):
    return EncodedData.from_data(data)


def batches(enc, split, batch_size=256, **kw):
    return make_dataset(enc.features[split], enc.labels[split], batch_size=batch_size, **kw)


def values(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]
