"""Initializers for stacked (grouped) kernels."""
from __future__ import annotations

import math
import random

import keras

from mdmt_tf.layers._util import register


@register
class GroupedGlorotUniform(keras.initializers.Initializer):
    """Glorot-uniform for a stack of kernels of shape (..., fan_in, fan_out).

    Keras' GlorotUniform folds leading dimensions into the fans, which would shrink a
    stack of E experts' kernels by sqrt(E); here each (fan_in, fan_out) slice gets the
    scale of an ordinary Dense kernel. Like Keras' initializers, an unseeded instance
    draws its seed from Python's `random` (so keras.utils.set_random_seed fixes it).
    """

    def __init__(self, seed=None):
        self.seed = seed if seed is not None else random.randint(1, 2**31 - 1)

    def __call__(self, shape, dtype=None):
        limit = math.sqrt(6.0 / (shape[-2] + shape[-1]))
        return keras.random.uniform(shape, -limit, limit, dtype=dtype, seed=self.seed)

    def get_config(self):
        return {"seed": self.seed}
