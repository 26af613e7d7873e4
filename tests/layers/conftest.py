"""Helpers shared by the layer tests: a fixed seed per test and a serialization round trip."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _fixed_seed():
    keras.utils.set_random_seed(1234)


def to_np(x):
    return None if x is None else keras.ops.convert_to_numpy(x)


def _roundtrip(layer, *args, **kwargs):
    """serialize -> JSON -> deserialize; config equality; the rebuilt layer with copied weights
    gives identical outputs on the same inputs. Returns the clone."""
    config = keras.saving.serialize_keras_object(layer)
    assert config["registered_name"] == f"mdmt_tf>{type(layer).__name__}"
    config = json.loads(json.dumps(config))  # must survive a real save
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is type(layer)
    assert clone is not layer
    assert clone.get_config() == layer.get_config()
    expected = layer(*args, **kwargs)
    clone(*args, **kwargs)  # build
    weights = layer.get_weights()
    assert [w.shape for w in clone.get_weights()] == [w.shape for w in weights]
    clone.set_weights(weights)
    got = clone(*args, **kwargs)
    if isinstance(expected, (tuple, list)):
        assert len(got) == len(expected)
        for e, g in zip(expected, got):
            if e is None:
                assert g is None
            else:
                np.testing.assert_array_equal(to_np(g), to_np(e))
    else:
        np.testing.assert_array_equal(to_np(got), to_np(expected))
    return clone


@pytest.fixture
def roundtrip():
    return _roundtrip
