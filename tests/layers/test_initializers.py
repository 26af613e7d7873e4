"""Every weight draws its own initial values (a shared seeded initializer would repeat them)."""
import keras
import numpy as np
import pytest

from mdmt_tf.layers import MLP, ExpertGroup, GateNU, GroupedGlorotUniform, PPNetTowers, SoftmaxGate, Towers


def _kernels(layer):
    return [np.asarray(v) for v in layer.weights if "kernel" in v.path]


@pytest.mark.parametrize("make, shape", [
    (lambda: MLP((4, 4)), (None, 4)),
    (lambda: ExpertGroup(2, (4, 4)), (None, 4)),
    (lambda: Towers(2, (4, 4)), (None, 4)),
    (lambda: SoftmaxGate(4, hidden_units=(4, 4)), (None, 4)),
    (lambda: GateNU(4, hidden_units=4), (None, 4)),
])
def test_same_shaped_kernels_differ(make, shape):
    keras.utils.set_random_seed(0)
    layer = make()
    layer.build(shape)
    kernels = [k for k in _kernels(layer) if k.shape == _kernels(layer)[0].shape]
    assert len(kernels) >= 2
    for other in kernels[1:]:
        assert not np.array_equal(kernels[0], other)
        assert abs(np.corrcoef(kernels[0].ravel(), other.ravel())[0, 1]) < 0.5


def test_explicit_seed_is_reproducible_and_offset_per_weight():
    a = ExpertGroup(2, (4, 4), kernel_initializer=GroupedGlorotUniform(seed=3))
    b = ExpertGroup(2, (4, 4), kernel_initializer=GroupedGlorotUniform(seed=3))
    a.build((None, 4)), b.build((None, 4))
    np.testing.assert_array_equal(np.asarray(a.kernels[0]), np.asarray(b.kernels[0]))
    assert not np.array_equal(np.asarray(a.kernels[0]), np.asarray(a.kernels[1]))


def test_ppnet_kernels_differ():
    keras.utils.set_random_seed(1)
    layer = PPNetTowers(2, units=(4,))
    layer.build((None, 4), (None, 3))
    assert not np.array_equal(np.asarray(layer.kernels[0])[..., :1], np.asarray(layer.kernels[1]))
