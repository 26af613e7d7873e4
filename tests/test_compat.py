"""What mdmt_tf relies on in each private Keras / TensorFlow / Keras Tuner API it uses
(mdmt_tf.compat): an upgrade that changes one fails here, by name."""
import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from mdmt_tf import compat


def test_sublayers_reaches_nested_layers_but_not_the_layer_itself():
    from mdmt_tf.layers import MLP

    class Outer(keras.layers.Layer):
        def __init__(self):
            super().__init__(name="outer")
            self.inner = MLP((4, 2), norm="layer", name="inner")

    outer = Outer()
    names = {layer.name for layer in compat.sublayers(outer)}
    assert {"inner", "dense_0", "dense_1", "norm_0"} <= names and "outer" not in names


def test_in_multi_worker_mode_is_false_on_one_worker():
    assert compat.in_multi_worker_mode() is False  # no strategy
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert compat.in_multi_worker_mode() is False
    assert callable(tf.distribute.MirroredStrategy().extended._in_multi_worker_mode)


def test_keras_calls_the_symbolic_build_hook_that_no_symbolic_build_silences():
    """Keras' trainer still calls _maybe_symbolic_build(iterator=..., data_batch=...) in fit
    and evaluate; the mix-in's override is what keeps it from all-reducing a sample batch."""
    assert callable(keras.Model._maybe_symbolic_build)
    calls = []

    class Probe(compat.NoSymbolicBuild, keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            calls.append((iterator is not None, data_batch is not None))
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    model = Probe()
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 3), "float32"), np.ones((4, 1), "float32"), epochs=1, verbose=0)
    assert calls, "Keras no longer calls _maybe_symbolic_build: NoSymbolicBuild is dead code"


def test_hyperband_iteration_trials_follows_keras_tuners_brackets():
    """The count is the sum of the brackets' sizes over their rounds, read through the three
    private oracle methods this relies on."""
    oracle = kt.oracles.HyperbandOracle(objective=kt.Objective("x", direction="max"), max_epochs=9, factor=3)
    sizes = [[oracle._get_size(b, r) for r in range(oracle._get_num_rounds(b))]
             for b in range(oracle._get_num_brackets())]
    assert compat.hyperband_iteration_trials(oracle) == sum(map(sum, sizes)) > oracle._get_num_brackets()
    assert sizes[0][0] >= sizes[0][-1]  # a bracket's rounds shrink


def test_keras_tuner_debug_switches_and_restores_its_flag():
    from keras_tuner.src import config

    before = config.DEBUG
    with compat.keras_tuner_debug(not before):
        assert config.DEBUG is (not before)
    assert config.DEBUG is before
